//! ApprovalVote: one category head's decision on one generation of one AgentJob.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "agentgate.dev",
    version = "v1alpha1",
    kind = "ApprovalVote",
    namespaced,
    status = "ApprovalVoteStatus",
    shortname = "av",
    category = "agentgate",
    doc = "A category head's vote on one generation of an AgentJob; immutable once cast.",
    printcolumn(name = "Job", type_ = "string", json_path = ".spec.jobRef.name"),
    printcolumn(name = "Voter", type_ = "string", json_path = ".spec.voter"),
    printcolumn(name = "Decision", type_ = "string", json_path = ".spec.decision"),
    printcolumn(name = "Counted", type_ = "boolean", json_path = ".status.counted"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message", priority = 1),
    selectable = ".spec.jobRef.name"
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self == oldSelf", "message": "ApprovalVote spec is immutable: delete the vote and cast a new one"}
]))]
pub struct ApprovalVoteSpec {
    pub job_ref: JobRef,
    /// Must equal the username that creates the object (enforced by admission policy).
    #[schemars(length(min = 1, max = 253))]
    pub voter: String,
    pub decision: Decision,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
    /// The voter's groups, stamped at admission from the request that created the vote (any
    /// value a client sends is replaced), so group-based RBAC counts when heads are checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub voter_groups: Vec<String>,
    /// How sure the voter is, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub confidence: Option<i32>,
}

/// Binds a vote to one generation of one job, so a spec change voids earlier votes.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 64))]
    pub uid: String,
    #[schemars(range(min = 1))]
    pub generation: i64,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Decision {
    Approve,
    Reject,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalVoteStatus {
    /// `false` (with `message` saying why) on a vote that does not count. A vote that counts is
    /// named in its job's `status.approval` and gets no status of its own, to save a write per
    /// vote; `true` only takes back an earlier `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
