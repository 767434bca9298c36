//! AgentJob's status: what the operator found and did (estimate, readiness, approvals, attempts,
//! usage). The spec is in `agent_job.rs`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use strum::{EnumString, IntoStaticStr, VariantArray};

use super::condition::{Condition, Text};
use super::schema;

/// Serde and strum both name a phase by its variant name, as the CRD's status.phase enum does
/// (`phase_names_match_the_wire_format` checks they agree).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, IntoStaticStr, EnumString, VariantArray)]
pub enum JobPhase {
    Pending,
    WaitingForResources,
    AwaitingApproval,
    Running,
    Succeeded,
    Failed,
    Rejected,
}

impl JobPhase {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobPhase::Succeeded | JobPhase::Failed | JobPhase::Rejected)
    }

    pub fn as_str(self) -> &'static str {
        self.into()
    }

    pub const ALL: &[JobPhase] = <JobPhase as VariantArray>::VARIANTS;
}

// The structs most jobs never fill (`usage`, `output`, `toolEndpoints`, `meter`) are boxed: an
// empty `Option` of a struct costs its whole size inline, and 10,000 cached jobs hold one each
// (`controller::memory` test `what_a_cached_job_awaiting_approval_costs`). So is `estimate`,
// which most have: it takes a cached job (its `Arc`) from jemalloc's 1,536-byte size class to
// 1,280 for a box of 112. A box serialises as its content, so the CRD is the same (a `//`
// comment: a doc comment would enter the schema).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentJobStatus {
    /// None also when a newer operator version wrote a phase this one does not know
    /// (`known_phase`); `decide` then re-derives it.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "known_phase")]
    pub phase: Option<JobPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Box<Estimate>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<ReadinessCheck>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_tools: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub insufficient_resources: Vec<String>,
    /// Optional resources the job runs without because no node could provide them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped_resources: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
    /// Sum over every attempt: usage is never overwritten by a retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Box<Usage>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::free_form")]
    pub output: Option<Box<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The endpoints of the job's tools when it was approved. Until the job starts, a tool that
    /// points elsewhere voids the approving votes: heads approved sending the job's data there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_endpoints: Option<Box<ApprovedToolEndpoints>>,
    /// Votes that no longer count because what they approved changed (tool endpoints) before the
    /// job started, each with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_votes: Vec<IgnoredVote>,
    /// Cost advice drawn from this namespace's finished jobs of the same jobType, written once,
    /// with the status that finishes the job (domain/recommend.rs). Largest saving first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5))]
    pub recommendations: Vec<Recommendation>,
    /// The agent meters' draw on `budget.maxCostUSD` and their measured usage: every grant is
    /// recorded here before the meter receives it (controller/meter_api.rs, domain/grants.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meter: Option<Box<MeterStatus>>,
    /// What each spec generation the operator saw did, oldest first, the last
    /// `domain::history::HISTORY_LIMIT` of them. Each generation's full spec is kept in a
    /// ControllerRevision owned by the job (`kubectl agentgate history`, `rerun`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<GenerationRecord>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
pub enum RecommendationKind {
    /// Another model, already used as the primary's for this jobType here, did as well for less.
    CheaperModel,
    /// A model whose provider discounts cached input, with almost no input read from cache.
    PromptCache,
    /// The budget is far above what runs of this jobType cost (p90).
    BudgetTooHigh,
    /// Runs' p90 cost is near the budget: estimates will soon exceed it and jobs be rejected.
    BudgetTooTight,
    /// Failed attempts take a large share of the spend.
    RetrySpend,
    /// One supporting agent's model takes most of the spend.
    SupportingAgentCost,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Recommendation {
    pub kind: RecommendationKind,
    /// What to change.
    #[schemars(length(max = 512))]
    pub summary: String,
    /// The figures it rests on, from the finished jobs counted in `samples`.
    #[schemars(length(max = 1024))]
    pub evidence: String,
    /// Finished jobs of the jobType (in this namespace) the advice rests on.
    pub samples: i64,
    /// Estimated saving per run, in USD ("0.00" when the advice avoids risk rather than spend).
    #[serde(rename = "savingPerRunUSD")]
    pub saving_per_run_usd: String,
    /// What the sampled runs would have saved together, in USD.
    #[serde(rename = "savingOverSamplesUSD")]
    pub saving_over_samples_usd: String,
}

/// Totals over every grant of every attempt, as USD decimal strings.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeterStatus {
    /// Handed out to meters so far.
    #[serde(rename = "grantedUSD")]
    pub granted_usd: String,
    /// Measured by the meters so far (calls whose usage could not be read count their reservation).
    #[serde(rename = "spentUSD")]
    pub spent_usd: String,
    /// Held against the budget: what a settled grant spent, and all of an open grant (its meter may
    /// still spend it, or has died without saying). Never above `budget.maxCostUSD`.
    #[serde(rename = "committedUSD")]
    pub committed_usd: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<MeterGrant>,
}

/// One meter process's account: a Pod's meter, from its start to its exit.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeterGrant {
    pub pod: String,
    #[serde(rename = "podUID")]
    pub pod_uid: String,
    pub attempt: i32,
    /// `sha256:` and 32 hex digits of the random id the meter draws when it starts (the id itself
    /// is never stored: whoever read it could speak for the session); a restarted meter container
    /// is a new session.
    pub session: String,
    /// The last request of this session applied: a request not above it is a retry, answered
    /// with the state it already produced and never applied twice.
    pub sequence: i64,
    #[serde(rename = "grantedUSD")]
    pub granted_usd: String,
    #[serde(rename = "spentUSD")]
    pub spent_usd: String,
    /// The meter has exited and returned what it did not spend.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub settled: bool,
    /// Measured usage so far, cumulative.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Calls this meter refused with 402 because the job's budget could not cover their worst
    /// case, cumulative: any makes its attempt end the job `BudgetExhausted`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub budget_refusals: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// One spec generation of a job and what it did.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GenerationRecord {
    pub generation: i64,
    /// `sha256:<hex>` of the spec as JSON; the ControllerRevision holding the spec carries it too.
    pub spec_digest: SpecDigest,
    /// When the operator first saw this generation.
    pub observed_time: Time,
    /// `approved/required` when this generation was last gated, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvals: Option<Text>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approved_by: Vec<String>,
    /// Attempts that ran this generation.
    #[serde(default)]
    pub attempts: i32,
    /// What those attempts used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_tokens: Option<i64>,
    #[serde(default, rename = "costUSD", skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<String>,
    /// The job's phase while this is the current generation; afterwards the result of its last
    /// attempt, `Superseded` if none ran, or `NotRun` if it came after the job had finished.
    pub result: Text,
}

/// A spec digest as a cached job keeps it: `sha256:` and 64 lowercase hex digits as their 32
/// bytes, boxed (32 B of heap, not the text's 80, in each of 10,000 cached jobs' history), and
/// any other text as written. Reads, writes and compares as its text; its schema is a string's.
#[derive(Clone, PartialEq, Eq)]
pub enum SpecDigest {
    Sha256(Box<[u8; 32]>),
    Other(Box<str>),
}

/// The 32 bytes of a canonical `sha256:<64 lowercase hex digits>`.
fn sha256_bytes(text: &str) -> Option<[u8; 32]> {
    let hex = text.strip_prefix("sha256:").filter(|h| h.len() == 64 && h.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))?;
    let digit = |c: u8| if c <= b'9' { c - b'0' } else { c - b'a' + 10 };
    let mut bytes = [0u8; 32];
    for (byte, pair) in bytes.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        *byte = (digit(pair[0]) << 4) | digit(pair[1]);
    }
    Some(bytes)
}

impl From<String> for SpecDigest {
    fn from(text: String) -> Self {
        match sha256_bytes(&text) {
            Some(bytes) => SpecDigest::Sha256(Box::new(bytes)),
            None => SpecDigest::Other(text.into()),
        }
    }
}

impl std::fmt::Display for SpecDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpecDigest::Sha256(bytes) => {
                f.write_str("sha256:")?;
                bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
            SpecDigest::Other(text) => f.write_str(text),
        }
    }
}

impl std::fmt::Debug for SpecDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.to_string(), f)
    }
}

impl PartialEq<String> for SpecDigest {
    fn eq(&self, other: &String) -> bool {
        // Only a canonical text reads as bytes, and writes back as itself.
        match self {
            SpecDigest::Other(text) => **text == **other,
            SpecDigest::Sha256(bytes) => sha256_bytes(other).is_some_and(|b| b == **bytes),
        }
    }
}

impl PartialEq<SpecDigest> for String {
    fn eq(&self, other: &SpecDigest) -> bool {
        other == self
    }
}

impl Serialize for SpecDigest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpecDigest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(SpecDigest::from)
    }
}

impl JsonSchema for SpecDigest {
    fn inline_schema() -> bool {
        <String as JsonSchema>::inline_schema()
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        <String as JsonSchema>::schema_name()
    }

    fn schema_id() -> std::borrow::Cow<'static, str> {
        <String as JsonSchema>::schema_id()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        <String as JsonSchema>::json_schema(generator)
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovedToolEndpoints {
    /// Generation of the spec that was approved.
    pub generation: i64,
    pub tools: Vec<ToolEndpointRecord>,
    /// Names of the votes that approved the job with these endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approved_by: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ToolEndpointRecord {
    pub name: String,
    /// `service <namespace>/<name>:<port>`, `url <url>`, or `none` when the AgentTool did not exist.
    pub endpoint: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Estimate {
    /// Generation of the spec this estimate was made for.
    pub generation: i64,
    pub tokens: TokenRange,
    #[serde(rename = "costUSD")]
    pub cost_usd: CostRange,
    /// `prior`, `history` or `blend`.
    pub method: Text,
    pub samples: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelEstimate>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct TokenRange {
    pub p50: i64,
    pub p90: i64,
}

/// USD as decimal strings, like the budget they are compared with.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct CostRange {
    pub p50: Text,
    pub p90: Text,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelEstimate {
    pub model: Text,
    pub tokens: TokenRange,
    #[serde(rename = "costUSD")]
    pub cost_usd: CostRange,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ReadinessCheck {
    pub name: Text,
    pub passed: bool,
    pub message: Text,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalStatus {
    pub required: i32,
    pub approved: i32,
    /// `approved/required`, for `kubectl get`.
    pub summary: Text,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvers: Vec<Approver>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_by: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored_votes: Vec<IgnoredVote>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Approver {
    pub voter: String,
    /// The ApprovalVote object.
    pub vote: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct IgnoredVote {
    pub name: String,
    pub why: String,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AttemptResult {
    #[default]
    Running,
    Succeeded,
    Failed,
}

/// Status values a newer operator version may write and this one does not know are read, not
/// refused: one unknown enum value must not make a job unreadable (controller/decode.rs reports
/// and skips an object that does not decode). An unknown phase reads as none, re-derived by
/// `decide::rederive_phase`.
fn known_phase<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<JobPhase>, D::Error> {
    let name = Option::<String>::deserialize(deserializer)?;
    Ok(name.and_then(|name| name.parse().ok()))
}

/// An attempt that ended in a way this version does not know counts as failed: it never runs
/// again, and what it recorded (usage included) is kept.
fn known_result<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<AttemptResult, D::Error> {
    Ok(match String::deserialize(deserializer)?.as_str() {
        "Running" => AttemptResult::Running,
        "Succeeded" => AttemptResult::Succeeded,
        _ => AttemptResult::Failed,
    })
}

// Default only spares tests from spelling out every field; the operator builds attempts with
// `decide::running_attempt`, which sets `learned: Some(false)` (an absent mark means "learned by
// an older operator").
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    pub attempt: i32,
    /// Spec generation the attempt runs.
    pub generation: i64,
    pub pods: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    #[serde(deserialize_with = "known_result")]
    pub result: AttemptResult,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The attempt's usage, absent while it runs: what its meters measured when it was metered,
    /// else what its agents reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// What the agents reported themselves when the attempt was metered: kept for comparison
    /// (a disagreement is a `UsageClaimMismatch` Warning Event), never counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_usage: Option<Usage>,
    /// Pods whose meter ran and reported nothing, neither to the meter API nor in its
    /// termination message: the attempt's usage counts only what was measured, never the agents'
    /// own reports, and the estimator does not learn it (`UsageReported` reason `UsageUnmeasured`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unmeasured_pods: Vec<String>,
    /// `true` once the estimator has learned this attempt's usage and the token and cost counters
    /// have counted it (set in the status write after that), `false` until then. Absent on
    /// attempts stored by an operator older than this mark, which learned and counted usage as it
    /// first appeared: those are marked, never learned or counted again (controller/learning_mark.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned: Option<bool>,
    /// The tools' rate limit the attempt holds while it runs: the `minRateLimit` of each tool in
    /// the spec it was started from, fixed then. Absent on attempts stored by an older operator
    /// (or found only through Pods of another generation): the current spec's claims count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_claims: Option<Vec<ToolClaim>>,
}

/// Calls per minute an attempt holds of one tool's shared rate limit.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolClaim {
    pub name: String,
    pub min_rate_limit: i32,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    /// Anthropic prompt-cache writes with the 5-minute TTL, priced above input; absent: 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_input_tokens: i64,
    /// Anthropic prompt-cache writes with the 1-hour TTL; absent: 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_1h_input_tokens: i64,
    pub total_tokens: i64,
    #[serde(rename = "costUSD")]
    pub cost_usd: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelUsage>,
    /// (actual - estimated p50) / estimated p50, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate_error_percent: Option<i64>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelUsage {
    pub model: String,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_input_tokens: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_1h_input_tokens: i64,
    #[serde(rename = "costUSD")]
    pub cost_usd: String,
}

#[cfg(test)]
mod tests {
    use super::JobPhase;

    /// A digest reads and writes as the text it was, whatever it is, and only a canonical
    /// sha256 one is kept as bytes.
    #[test]
    fn a_spec_digest_round_trips_as_its_text() {
        use super::SpecDigest;
        let canonical = format!("sha256:{}", "0123456789abcdef".repeat(4));
        let upper = format!("sha256:{}", "0123456789ABCDEF".repeat(4));
        for text in [canonical.as_str(), upper.as_str(), "sha256:abc", "md5:x", "", "sha256:é"] {
            let digest: SpecDigest = serde_json::from_value(serde_json::json!(text)).unwrap();
            assert_eq!(serde_json::to_value(&digest).unwrap(), serde_json::json!(text));
            assert_eq!(digest, text.to_string());
            assert_eq!(matches!(digest, SpecDigest::Sha256(_)), text == canonical, "{text}");
        }
        assert_ne!(SpecDigest::from(canonical), SpecDigest::from(upper));
    }

    #[test]
    fn phase_names_match_the_wire_format() {
        for &phase in JobPhase::ALL {
            assert_eq!(serde_json::to_value(phase).unwrap(), phase.as_str(), "serde and strum name {phase:?} alike");
            assert_eq!(phase.as_str().parse::<JobPhase>(), Ok(phase));
        }
    }
}
