//! AgentJob: one AI-agent run, gated on cost, readiness and two approvals. Its spec; the status
//! types are in `agent_job_status.rs`.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::agent_job_status::AgentJobStatus;
use super::schema;

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "agentgate.dev",
    version = "v1alpha1",
    kind = "AgentJob",
    namespaced,
    status = "AgentJobStatus",
    shortname = "aj",
    category = "agentgate",
    doc = "An AI-agent job: estimated, checked for readiness and approved before its Pods run.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Approvals", type_ = "string", json_path = ".status.approval.summary"),
    printcolumn(
        name = "Est. Cost",
        type_ = "string",
        json_path = ".status.estimate.costUSD.p90",
        description = "p90 estimated cost in USD"
    ),
    printcolumn(
        name = "Cost",
        type_ = "string",
        json_path = ".status.usage.costUSD",
        description = "cost in USD of the finished attempts"
    ),
    printcolumn(
        name = "Spent",
        type_ = "string",
        json_path = ".status.meter.spentUSD",
        description = "cost in USD measured by the agent meters so far, live while the job runs"
    ),
    printcolumn(name = "Tokens", type_ = "integer", json_path = ".status.usage.totalTokens"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", priority = 1),
    selectable = ".spec.category"
)]
#[serde(rename_all = "camelCase")]
pub struct AgentJobSpec {
    /// Key the estimator learns under; defaults to metadata.name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$"))]
    pub job_type: Option<String>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,

    /// Decides whose approval counts: heads of this category may `approve` it.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub category: String,

    /// 1 is most urgent; orders jobs that wait for capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub priority: Option<i32>,

    pub agents: Agents,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub tools: Vec<ToolRequirement>,

    /// Per agent Pod; they become the Pod's requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<AgentResources>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<JobLimits>,

    pub budget: Budget,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalRequirement>,

    // The three free-form values are boxed: 8 bytes inline, not 32, in each of 10,000 cached
    // jobs, which leave them out when big (controller::slim::job) and mostly have none.
    /// Handed to every agent as AGENTGATE_INPUT (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::free_form")]
    pub input: Option<Box<serde_json::Value>>,

    /// JSON Schema that `input` must satisfy before anything runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::free_form")]
    pub input_schema: Option<Box<serde_json::Value>>,

    /// JSON Schema that the agents' reported output must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::free_form")]
    pub output_schema: Option<Box<serde_json::Value>>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.supporting) || self.supporting.all(s, s.name != self.primary.name)",
     "message": "agent names must be unique: a supporting agent has the primary agent's name",
     "fieldPath": ".supporting"}
]))]
pub struct Agents {
    pub primary: Agent,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 15))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub supporting: Vec<Agent>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Agent {
    /// Part of the agent Pod's name.
    #[schemars(length(min = 1, max = 40), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Printable ASCII without spaces, like every image reference: no line breaks or look-alikes.
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^[!-~]+$"))]
    pub image: String,
    /// Model id priced by the operator's price table, e.g. `gpt-4o-mini`.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9][-A-Za-z0-9_.:/@]*$"))]
    pub model: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 4096)))]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 4096)))]
    pub args: Vec<String>,
    /// Plain values only; secrets come through `valueFrom`, never inline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub env: Vec<AgentEnvVar>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!self.name.startsWith('AGENTGATE_')", "message": "env names starting with AGENTGATE_ are reserved for the operator",
     "fieldPath": ".name"},
    {"rule": "has(self.value) != has(self.valueFrom)", "message": "set exactly one of value or valueFrom"}
]))]
pub struct AgentEnvVar {
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<EnvValueFrom>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvValueFrom {
    pub secret_key_ref: SecretKeySelector,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolRequirement {
    /// Name of a cluster-scoped AgentTool.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// A missing required tool blocks the job; a missing optional one only warns.
    #[serde(default = "default_true")]
    pub required: bool,
    /// Calls per minute this job needs from the tool's shared rate limit.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000000))]
    pub min_rate_limit: i32,
    /// Expected calls per run; feeds the cost estimate.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100000))]
    pub estimated_calls: i32,
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.optional) || !self.optional.exists(o, o == 'gpu') || (has(self.gpu) && self.gpu > 0)",
     "message": "optional: [gpu] needs gpu > 0", "fieldPath": ".optional"}
]))]
pub struct AgentResources {
    #[schemars(schema_with = "schema::cpu_quantity")]
    pub cpu: String,
    #[schemars(schema_with = "schema::memory_quantity")]
    pub memory: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 16))]
    pub gpu: Option<i32>,
    /// Extended resource the GPUs are requested as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$"))]
    pub gpu_resource_name: Option<String>,
    /// Resources the job may run without when no node can provide them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub optional: Vec<OptionalResource>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OptionalResource {
    Gpu,
}

pub const DEFAULT_MAX_EXECUTION_SECONDS: i64 = 3600;
pub const DEFAULT_MAX_RETRIES: i32 = 0;

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobLimits {
    /// Becomes the Pods' activeDeadlineSeconds. At most 7 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub max_execution_seconds: Option<i64>,
    /// New attempts after a failed one; without it a failed attempt fails the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub max_retries: Option<i32>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// Positive decimal string in USD, at most 6 decimals, at most 1000000.
    #[serde(rename = "maxCostUSD")]
    #[schemars(schema_with = "schema::usd_budget")]
    pub max_cost_usd: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000_000i64))]
    pub max_tokens: Option<i64>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRequirement {
    /// Raises the operator's approval floor for this job; never lowers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub required: Option<i32>,
}
