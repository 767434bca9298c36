//! Casting ApprovalVotes as yourself: by hand with the `kubectl agentgate` plugin, or by policy
//! with `agentgate review`, a reviewer loop that runs as a category head's ServiceAccount.
//!
//! Both ask the apiserver who they are (a SelfSubjectReview) instead of taking a name from the
//! user, so `spec.voter` always matches the identity the admission policy sees. Both create the
//! vote through [`cast_vote`], named `<job>-<user>-g<generation>` and bound to the job's current
//! uid and generation.
//!
//! The pure parts (naming, the review policy and its [`evaluate`], the `votes` table) are unit
//! tested here; the Kubernetes parts are covered by `tests/plugin_and_review.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde::Deserialize;

use crate::api::{AgentJob, ApprovalVote, ApprovalVoteSpec, Decision, JobPhase, JobRef};
use crate::domain::money::MicroUsd;

/// Annotation the admission policy stamps on every job with its creator.
const REQUESTED_BY: &str = "agentgate.dev/requested-by";
/// The schema's limit on `spec.reason`.
const MAX_REASON: usize = 1024;
/// Longest vote name we choose, leaving room for the 5 characters `generateName` appends
/// within the 253 a name may have.
const MAX_VOTE_NAME: usize = 240;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum VoteError {
    #[error("AgentJob {name} not found in namespace {namespace}")]
    JobNotFound { namespace: String, name: String },
    #[error(
        "{voter} already voted {decision:?} on generation {generation} of {job} (vote {vote}); only a voter's first vote counts. To change it, delete that vote (kubectl delete approvalvote {vote} -n {namespace}) and vote again"
    )]
    AlreadyVoted { voter: String, job: String, namespace: String, generation: i64, vote: String, decision: Decision },
    #[error(
        "forbidden: you may not {verb} {resource}.{group}{scope}; ask for an RBAC Role (or ClusterRole) and binding that grants verb \"{verb}\" on resource \"{resource}\" in API group \"{group}\". The apiserver said: {message}"
    )]
    Forbidden { verb: String, resource: String, group: String, scope: String, message: String },
    #[error("the apiserver refused the vote: {0}")]
    Refused(String),
    #[error("the apiserver did not say who you are (SelfSubjectReview has no username)")]
    NoUsername,
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// Turns an API error into a message that says what to do about it. `verb` and `resource`
/// (`<plural>.<group>`) name the request that failed, for a 403 that RBAC gave.
fn explain(error: kube::Error, verb: &str, resource: &str, namespace: Option<&str>) -> VoteError {
    let (resource, group) = resource.split_once('.').unwrap_or((resource, ""));
    match error {
        kube::Error::Api(status) if status.code == 403 => {
            // RBAC denials read `User "x" cannot <verb> resource "<r>" ...`; anything else with
            // a 403 came from admission (for instance the voter identity policy).
            if status.message.contains(" cannot ") {
                VoteError::Forbidden {
                    verb: verb.into(),
                    resource: resource.into(),
                    group: group.into(),
                    scope: namespace.map(|ns| format!(" in namespace {ns}")).unwrap_or_else(|| " cluster-wide".into()),
                    message: status.message,
                }
            } else {
                VoteError::Refused(status.message)
            }
        }
        kube::Error::Api(status) if status.code == 422 || status.code == 400 => VoteError::Refused(status.message),
        other => VoteError::Kube(other),
    }
}

// ---------------------------------------------------------------------------------------------
// Identity and naming
// ---------------------------------------------------------------------------------------------

/// The username the apiserver authenticates this client as.
pub async fn whoami(client: &Client) -> Result<String, VoteError> {
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let review = api
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .map_err(|e| explain(e, "create", "selfsubjectreviews.authentication.k8s.io", None))?;
    review.status.and_then(|s| s.user_info).and_then(|u| u.username).filter(|u| !u.is_empty()).ok_or(VoteError::NoUsername)
}

/// A username as a DNS label, for vote names: `system:serviceaccount:ns:name` → `sa-ns-name`,
/// `Alice@Example.com` → `alice-example-com`. Not an identity: `spec.voter` carries that.
pub fn sanitize_username(user: &str) -> String {
    let raw = match user.strip_prefix("system:serviceaccount:") {
        Some(rest) => format!("sa-{rest}"),
        None => user.to_string(),
    };
    let mut label = String::with_capacity(raw.len());
    for c in raw.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            label.push(c);
        } else if !label.ends_with('-') {
            label.push('-');
        }
    }
    let mut label = label.trim_matches('-').to_string();
    label.truncate(63);
    let label = label.trim_end_matches('-').to_string();
    if label.is_empty() { "user".into() } else { label }
}

/// `<job>-<user>-g<generation>`, shortened if needed to stay a valid object name.
pub fn vote_name(job: &str, user: &str, generation: i64) -> String {
    let suffix = format!("-{}-g{generation}", sanitize_username(user));
    let mut job_part = job.to_string();
    if job_part.len() + suffix.len() > MAX_VOTE_NAME {
        // Job names are ASCII (DNS subdomains), so any byte index is a char boundary.
        job_part.truncate(MAX_VOTE_NAME.saturating_sub(suffix.len()));
        job_part = job_part.trim_end_matches(['-', '.']).to_string();
    }
    format!("{job_part}{suffix}")
}

fn truncate_reason(reason: String) -> String {
    if reason.len() <= MAX_REASON {
        return reason;
    }
    let mut end = MAX_REASON - '…'.len_utf8();
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
}

// ---------------------------------------------------------------------------------------------
// Casting a vote (shared by the plugin and the reviewer)
// ---------------------------------------------------------------------------------------------

/// What a voter decided, before it is bound to a job.
#[derive(Clone, Debug, PartialEq)]
pub struct Ballot {
    pub decision: Decision,
    pub reason: Option<String>,
    pub confidence: Option<i32>,
}

/// The job as it is now: its uid and generation are what a vote binds to.
pub async fn get_job(client: &Client, namespace: &str, name: &str) -> Result<AgentJob, VoteError> {
    let api: Api<AgentJob> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(job)) => Ok(job),
        Ok(None) => Err(VoteError::JobNotFound { namespace: namespace.into(), name: name.into() }),
        Err(e) => Err(explain(e, "get", "agentjobs.agentgate.dev", Some(namespace))),
    }
}

/// Every vote naming `job` (by name; votes for an earlier job of that name included).
pub async fn votes_on(client: &Client, namespace: &str, job: &str) -> Result<Vec<ApprovalVote>, VoteError> {
    let api: Api<ApprovalVote> = Api::namespaced(client.clone(), namespace);
    let listed = api
        .list(&ListParams::default().fields(&format!("spec.jobRef.name={job}")))
        .await
        .map_err(|e| explain(e, "list", "approvalvotes.agentgate.dev", Some(namespace)))?;
    let mut votes = listed.items;
    votes.sort_by(|a, b| (a.creation_timestamp().map(|t| t.0), a.name_any()).cmp(&(b.creation_timestamp().map(|t| t.0), b.name_any())));
    Ok(votes)
}

fn is_vote_of(vote: &ApprovalVote, job: &AgentJob, voter: &str) -> bool {
    vote.spec.voter == voter
        && vote.spec.job_ref.name == job.name_any()
        && Some(&vote.spec.job_ref.uid) == job.metadata.uid.as_ref()
        && vote.spec.job_ref.generation == job.metadata.generation.unwrap_or(1)
}

/// `voter`'s vote on the job's current uid and generation, if any.
pub async fn existing_vote(client: &Client, job: &AgentJob, voter: &str) -> Result<Option<ApprovalVote>, VoteError> {
    let namespace = job.namespace().unwrap_or_default();
    Ok(votes_on(client, &namespace, &job.name_any()).await?.into_iter().find(|v| is_vote_of(v, job, voter)))
}

fn already_voted(vote: &ApprovalVote, job: &AgentJob) -> VoteError {
    VoteError::AlreadyVoted {
        voter: vote.spec.voter.clone(),
        job: job.name_any(),
        namespace: job.namespace().unwrap_or_default(),
        generation: vote.spec.job_ref.generation,
        vote: vote.name_any(),
        decision: vote.spec.decision,
    }
}

/// Creates `voter`'s vote on the job's current uid and generation, unless they already have one.
///
/// `voter` must be the client's own username (see [`whoami`]): the admission policy refuses
/// anything else. The vote is named `<job>-<user>-g<generation>`; if that name is taken by a
/// different vote (a deleted and recreated job, or two usernames that sanitize alike), the
/// apiserver picks a unique suffix instead.
pub async fn cast_vote(client: &Client, job: &AgentJob, voter: &str, ballot: &Ballot) -> Result<ApprovalVote, VoteError> {
    let namespace = job.namespace().unwrap_or_default();
    let job_name = job.name_any();
    let generation = job.metadata.generation.unwrap_or(1);
    let uid = job.metadata.uid.clone().unwrap_or_default();

    // A vote under another name (cast with kubectl apply, say) counts as voted too. Without
    // list rights we cannot tell, and rely on the name below.
    match existing_vote(client, job, voter).await {
        Ok(Some(vote)) => return Err(already_voted(&vote, job)),
        Ok(None) => {}
        Err(VoteError::Forbidden { .. }) => {
            tracing::debug!(%namespace, "may not list votes; relying on the vote name to detect an earlier vote")
        }
        Err(e) => return Err(e),
    }

    let api: Api<ApprovalVote> = Api::namespaced(client.clone(), &namespace);
    let name = vote_name(&job_name, voter, generation);
    let spec = ApprovalVoteSpec {
        job_ref: JobRef { name: job_name.clone(), uid, generation },
        voter: voter.into(),
        decision: ballot.decision,
        reason: ballot.reason.clone().map(truncate_reason),
        voter_groups: Vec::new(), // stamped at admission from the request
        confidence: ballot.confidence,
    };
    let pp = PostParams { field_manager: Some("kubectl-agentgate".into()), ..PostParams::default() };
    let vote =
        ApprovalVote { metadata: ObjectMeta { name: Some(name.clone()), ..ObjectMeta::default() }, spec: spec.clone(), status: None };
    let explain_create = |e| explain(e, "create", "approvalvotes.agentgate.dev", Some(&namespace));
    match api.create(&pp, &vote).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let taken = api.get(&name).await.map_err(|e| explain(e, "get", "approvalvotes.agentgate.dev", Some(&namespace)))?;
            if is_vote_of(&taken, job, voter) {
                return Err(already_voted(&taken, job));
            }
            let vote = ApprovalVote {
                metadata: ObjectMeta { generate_name: Some(format!("{name}-")), ..ObjectMeta::default() },
                spec,
                status: None,
            };
            api.create(&pp, &vote).await.map_err(explain_create)
        }
        Err(e) => Err(explain_create(e)),
    }
}

// ---------------------------------------------------------------------------------------------
// The `votes` table
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub struct VoteRow {
    pub vote: String,
    pub voter: String,
    pub decision: Decision,
    pub generation: i64,
    /// `yes`, `no` or `pending` (not tallied yet).
    pub counted: &'static str,
    pub why: String,
    pub reason: String,
}

/// One row per vote: whether it counts and why, from the job's own tally where it has one (the
/// operator's current view), else from the vote's status.
pub fn vote_rows(job: &AgentJob, votes: &[ApprovalVote]) -> Vec<VoteRow> {
    let approval = job.status.as_ref().and_then(|s| s.approval.as_ref());
    votes
        .iter()
        .map(|v| {
            let name = v.name_any();
            let vote_status = v.status.as_ref();
            let from_vote = || match vote_status.and_then(|s| s.counted) {
                Some(counted) => (if counted { "yes" } else { "no" }, vote_status.and_then(|s| s.message.clone()).unwrap_or_default()),
                None => ("pending", "not tallied by the operator yet".to_string()),
            };
            let (counted, why) = match approval {
                Some(a) if a.approvers.iter().any(|x| x.vote == name) => (
                    "yes",
                    vote_status.and_then(|s| s.message.clone()).unwrap_or_else(|| format!("counted: one of {} approvals", a.required)),
                ),
                Some(a) => match a.ignored_votes.iter().find(|i| i.name == name) {
                    Some(ignored) => ("no", ignored.why.clone()),
                    None if v.spec.decision == Decision::Reject
                        && a.rejected_by.as_deref() == Some(v.spec.voter.as_str())
                        && is_current(v, job) =>
                    {
                        ("yes", "counted: this Reject rejects the job".to_string())
                    }
                    None => from_vote(),
                },
                None => from_vote(),
            };
            VoteRow {
                vote: name,
                voter: v.spec.voter.clone(),
                decision: v.spec.decision,
                generation: v.spec.job_ref.generation,
                counted,
                why,
                reason: v.spec.reason.clone().unwrap_or_default(),
            }
        })
        .collect()
}

fn is_current(vote: &ApprovalVote, job: &AgentJob) -> bool {
    Some(&vote.spec.job_ref.uid) == job.metadata.uid.as_ref() && vote.spec.job_ref.generation == job.metadata.generation.unwrap_or(1)
}

/// The job's approval summary followed by the vote table.
pub fn render_votes(job: &AgentJob, rows: &[VoteRow]) -> String {
    let mut out = String::new();
    let status = job.status.clone().unwrap_or_default();
    let phase = status.phase.map(JobPhase::as_str).unwrap_or("Pending");
    let _ = writeln!(
        out,
        "AgentJob {}/{} (generation {}, category {}): {phase}",
        job.namespace().unwrap_or_default(),
        job.name_any(),
        job.metadata.generation.unwrap_or(1),
        job.spec.category
    );
    match &status.approval {
        Some(a) => {
            let approvers: Vec<&str> = a.approvers.iter().map(|x| x.voter.as_str()).collect();
            let _ = writeln!(
                out,
                "Approvals {} (approved by: {}; rejected by: {})",
                a.summary,
                if approvers.is_empty() { "nobody".to_string() } else { approvers.join(", ") },
                a.rejected_by.as_deref().unwrap_or("nobody")
            );
        }
        None => {
            let _ = writeln!(out, "Approvals: not tallied yet");
        }
    }
    if let Some(c) = status.conditions.iter().find(|c| c.type_ == "Approved") {
        let _ = writeln!(out, "Approved={} ({}): {}", c.status, c.reason, c.message);
    }
    out.push('\n');
    if rows.is_empty() {
        out.push_str("No votes yet.\n");
        return out;
    }
    let header = ["VOTE", "VOTER", "DECISION", "GEN", "COUNTED", "WHY", "REASON"];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.vote.clone(),
                r.voter.clone(),
                format!("{:?}", r.decision),
                r.generation.to_string(),
                r.counted.to_string(),
                r.why.clone(),
                r.reason.clone(),
            ]
        })
        .collect();
    out + &crate::text_table::render(&header, &cells, 3)
}

// ---------------------------------------------------------------------------------------------
// Review policy
// ---------------------------------------------------------------------------------------------

/// What a reviewer approves without a human: anything else it rejects, naming the problem.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Highest p90 estimated cost approved.
    pub max_cost: MicroUsd,
    /// Tools a job may name; `None` allows any.
    pub allowed_tools: Option<Vec<String>>,
    /// Image prefixes every agent's image must be under; `None` allows any.
    pub allowed_images: Option<Vec<String>>,
    /// Highest `spec.limits.maxRetries` approved; `None` allows any.
    pub max_retries: Option<i32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicyFile {
    #[serde(rename = "maxCostUSD")]
    max_cost_usd: String,
    #[serde(default)]
    allowed_tools: Option<Vec<String>>,
    #[serde(default)]
    allowed_images: Option<Vec<String>>,
    #[serde(default)]
    max_retries: Option<i32>,
}

impl Policy {
    /// Reads `maxCostUSD: "1.00"`, `allowedTools: [...]`, `allowedImages: [prefix, ...]` and
    /// `maxRetries: N`; only maxCostUSD is required.
    pub fn from_yaml(yaml: &str) -> Result<Policy, String> {
        let file: PolicyFile = serde_saphyr::from_str(yaml).map_err(|e| format!("review policy: {e}"))?;
        let max_cost = MicroUsd::parse(file.max_cost_usd.trim())
            .ok_or_else(|| format!("review policy: maxCostUSD {:?} is not a USD amount such as \"1.00\"", file.max_cost_usd))?;
        if file.allowed_images.as_ref().is_some_and(|images| images.iter().any(|p| p.trim().is_empty())) {
            return Err("review policy: an empty allowedImages prefix would allow every image; remove allowedImages instead".into());
        }
        if file.max_retries.is_some_and(|r| r < 0) {
            return Err("review policy: maxRetries must not be negative".into());
        }
        Ok(Policy { max_cost, allowed_tools: file.allowed_tools, allowed_images: file.allowed_images, max_retries: file.max_retries })
    }
}

/// A reviewer's decision on one generation of one job.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub decision: Decision,
    pub reason: String,
    /// Percent.
    pub confidence: i32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Evaluation {
    Vote(Verdict),
    /// Not ready to be judged (no estimate yet, not awaiting approval): no vote, and why.
    Wait(String),
}

/// Whether `image` lies under `prefix`. A prefix not ending in `/`, `:` or `@` must be
/// followed by one of them, so `ghcr.io/acme` allows `ghcr.io/acme/scanner` but not
/// `ghcr.io/acme-evil/scanner`.
pub fn image_allowed(image: &str, prefix: &str) -> bool {
    let Some(rest) = image.strip_prefix(prefix) else { return false };
    prefix.ends_with(['/', ':', '@']) || rest.is_empty() || rest.starts_with(['/', ':', '@'])
}

/// How much an estimate is worth: one learned from this cluster's history more than a prior.
fn estimate_confidence(method: &str) -> i32 {
    match method {
        "history" => 90,
        "blend" => 80,
        _ => 70,
    }
}

/// Judges the job's current generation against the policy. Pure: everything it needs is in
/// the job's spec and status.
pub fn evaluate(policy: &Policy, job: &AgentJob) -> Evaluation {
    let generation = job.metadata.generation.unwrap_or(1);
    let status = job.status.clone().unwrap_or_default();
    if status.phase != Some(JobPhase::AwaitingApproval) {
        return Evaluation::Wait(format!("job is {}, not AwaitingApproval", status.phase.map(JobPhase::as_str).unwrap_or("Pending")));
    }
    if status.observed_generation.is_some_and(|g| g != generation) {
        return Evaluation::Wait(format!(
            "status is for generation {}, the job is at {generation}",
            status.observed_generation.unwrap_or_default()
        ));
    }
    let Some(estimate) = status.estimate.as_ref().filter(|e| e.generation == generation) else {
        return Evaluation::Wait(format!("no estimate for generation {generation} yet"));
    };
    let Some(p90) = MicroUsd::parse(&estimate.cost_usd.p90) else {
        return Evaluation::Wait(format!("estimated p90 cost {:?} is not a USD amount", estimate.cost_usd.p90));
    };

    let spec = &job.spec;
    let mut checked: Vec<String> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let mut certain_problem = false; // a fact about the spec, not a forecast

    if p90 > policy.max_cost {
        problems.push(format!("p90 estimated cost ${p90} is over the policy maximum ${}", policy.max_cost));
    } else {
        checked.push(format!("p90 estimated cost ${p90} within the policy maximum ${}", policy.max_cost));
    }

    let tools: Vec<&str> = spec.tools.iter().map(|t| t.name.as_str()).collect();
    if let Some(allowed) = &policy.allowed_tools {
        let disallowed: Vec<&str> = tools.iter().copied().filter(|t| !allowed.iter().any(|a| a == t)).collect();
        if disallowed.is_empty() {
            checked.push(if tools.is_empty() { "no tools".into() } else { format!("tools {} allowed", tools.join(", ")) });
        } else {
            certain_problem = true;
            problems.push(format!(
                "tool{} {} not in the policy's allowedTools [{}]",
                if disallowed.len() == 1 { "" } else { "s" },
                disallowed.join(", "),
                allowed.join(", ")
            ));
        }
    }

    if let Some(prefixes) = &policy.allowed_images {
        let agents = std::iter::once(&spec.agents.primary).chain(&spec.agents.supporting);
        let outside: Vec<String> = agents
            .filter(|a| !prefixes.iter().any(|p| image_allowed(&a.image, p)))
            .map(|a| format!("image {} (agent {})", a.image, a.name))
            .collect();
        if outside.is_empty() {
            checked.push(format!("images under {}", prefixes.join(", ")));
        } else {
            certain_problem = true;
            problems.push(format!("{} not under the policy's allowedImages [{}]", outside.join(", "), prefixes.join(", ")));
        }
    }

    if let Some(max) = policy.max_retries {
        let retries = spec.limits.as_ref().and_then(|l| l.max_retries).unwrap_or(0);
        if retries > max {
            certain_problem = true;
            problems.push(format!("maxRetries {retries} is over the policy maximum {max}"));
        } else {
            checked.push(format!("maxRetries {retries} within {max}"));
        }
    }

    let by_estimate = estimate_confidence(&estimate.method);
    let verdict = if problems.is_empty() {
        Verdict { decision: Decision::Approve, reason: format!("within review policy: {}", checked.join("; ")), confidence: by_estimate }
    } else {
        Verdict {
            decision: Decision::Reject,
            reason: format!("outside review policy: {}", problems.join("; ")),
            confidence: if certain_problem { 100 } else { by_estimate },
        }
    };
    Evaluation::Vote(Verdict { reason: truncate_reason(verdict.reason.clone()), ..verdict })
}

// ---------------------------------------------------------------------------------------------
// `agentgate review`
// ---------------------------------------------------------------------------------------------

#[derive(clap::Args, Debug)]
pub struct ReviewArgs {
    /// Category whose jobs to review; repeatable or comma-separated. The identity running the
    /// reviewer must be a head of each (RBAC `approve` on `categories`), or its votes won't count.
    #[arg(long = "category", required = true, value_delimiter = ',')]
    pub categories: Vec<String>,
    /// YAML review policy: `maxCostUSD: "1.00"`, optional `allowedTools: [..]`,
    /// `allowedImages: [prefix, ..]` and `maxRetries: N`.
    #[arg(long)]
    pub policy: PathBuf,
    /// Review jobs in this namespace only (default: all namespaces).
    #[arg(long)]
    pub namespace: Option<String>,
    /// How often to retry votes that failed (seconds).
    #[arg(long, default_value_t = 30)]
    pub retry_seconds: u64,
}

struct Reviewer {
    client: Client,
    me: String,
    policy: Policy,
    categories: BTreeSet<String>,
    /// (uid, generation) already voted on, or deliberately left alone.
    done: BTreeSet<(String, i64)>,
    /// Jobs whose vote failed and should be tried again: (namespace, name) → latest copy.
    retry: BTreeMap<(String, String), AgentJob>,
}

impl Reviewer {
    async fn consider(&mut self, job: &AgentJob) {
        let namespace = job.namespace().unwrap_or_default();
        let name = job.name_any();
        let key = (namespace.clone(), name.clone());
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let generation = job.metadata.generation.unwrap_or(1);
        if !self.categories.contains(&job.spec.category) || self.done.contains(&(uid.clone(), generation)) {
            self.retry.remove(&key);
            return;
        }
        if job.status.as_ref().and_then(|s| s.phase) != Some(JobPhase::AwaitingApproval) {
            self.retry.remove(&key);
            return;
        }
        if job.annotations().get(REQUESTED_BY) == Some(&self.me) {
            tracing::info!(job = %name, %namespace, generation, "not reviewing a job this reviewer created: its vote would not count");
            self.done.insert((uid, generation));
            return;
        }
        let verdict = match evaluate(&self.policy, job) {
            Evaluation::Wait(why) => {
                tracing::debug!(job = %name, %namespace, generation, %why, "not voting yet");
                return;
            }
            Evaluation::Vote(v) => v,
        };
        let ballot = Ballot { decision: verdict.decision, reason: Some(verdict.reason.clone()), confidence: Some(verdict.confidence) };
        match cast_vote(&self.client, job, &self.me, &ballot).await {
            Ok(vote) => {
                tracing::info!(job = %name, %namespace, generation, vote = %vote.name_any(), decision = ?verdict.decision,
                    confidence = verdict.confidence, reason = %verdict.reason, "voted");
                self.done.insert((uid, generation));
                self.retry.remove(&key);
            }
            Err(VoteError::AlreadyVoted { vote, decision, .. }) => {
                tracing::info!(job = %name, %namespace, generation, %vote, ?decision, "already voted on this generation");
                self.done.insert((uid, generation));
                self.retry.remove(&key);
            }
            Err(e) => {
                tracing::warn!(job = %name, %namespace, generation, error = %e, "could not vote; will retry");
                self.retry.insert(key, job.clone());
            }
        }
    }
}

/// Watches the categories' jobs and votes on each generation awaiting approval, once, until
/// SIGTERM or Ctrl-C.
pub async fn run(args: ReviewArgs) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(&args.policy).map_err(|e| anyhow::anyhow!("reading review policy {}: {e}", args.policy.display()))?;
    let policy = Policy::from_yaml(&text).map_err(anyhow::Error::msg)?;
    let categories: BTreeSet<String> = args.categories.iter().map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect();
    anyhow::ensure!(!categories.is_empty(), "give at least one --category");

    let client = Client::try_default().await?;
    let me = whoami(&client).await?;
    tracing::info!(reviewer = %me, categories = ?categories, namespace = ?args.namespace, max_cost_usd = %policy.max_cost,
        allowed_tools = ?policy.allowed_tools, allowed_images = ?policy.allowed_images, max_retries = ?policy.max_retries, "starting reviewer");

    for category in &categories {
        warn_unless_head(&client, &me, category, args.namespace.as_deref()).await;
    }

    let api: Api<AgentJob> = match &args.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // One watch per category, filtered by the apiserver on the CRD's selectable field.
    let streams = categories
        .iter()
        .map(|c| watcher(api.clone(), watcher::Config::default().fields(&format!("spec.category={c}"))).default_backoff().boxed());
    let mut events = futures::stream::select_all(streams);
    let mut reviewer = Reviewer { client, me, policy, categories, done: BTreeSet::new(), retry: BTreeMap::new() };
    let mut retry = tokio::time::interval(Duration::from_secs(args.retry_seconds.max(1)));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                break;
            }
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(job) | watcher::Event::InitApply(job))) => reviewer.consider(&job).await,
                Some(Ok(watcher::Event::Delete(job))) => {
                    reviewer.retry.remove(&(job.namespace().unwrap_or_default(), job.name_any()));
                    let uid = job.metadata.uid.unwrap_or_default();
                    reviewer.done.retain(|(u, _)| *u != uid);
                }
                Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
                Some(Err(e)) => tracing::warn!(error = %e, "watching AgentJobs failed; retrying"),
                None => break,
            },
            _ = retry.tick() => {
                let pending: Vec<AgentJob> = reviewer.retry.values().cloned().collect();
                for job in pending {
                    reviewer.consider(&job).await;
                }
            }
        }
    }
    Ok(())
}

/// A reviewer that is no head of a category casts votes that never count: say so at start.
/// Only a warning, since a RoleBinding may make it a head in some namespaces only.
async fn warn_unless_head(client: &Client, me: &str, category: &str, namespace: Option<&str>) {
    use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(crate::api::GROUP.into()),
                resource: Some("categories".into()),
                verb: Some("approve".into()),
                name: Some(category.into()),
                namespace: namespace.map(str::to_string),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let scope = namespace.map(|ns| format!("in namespace {ns}")).unwrap_or_else(|| "cluster-wide".into());
    match Api::<SelfSubjectAccessReview>::all(client.clone()).create(&PostParams::default(), &review).await {
        Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {
            tracing::info!(%category, %scope, "this reviewer is a head of the category")
        }
        Ok(_) => tracing::warn!(reviewer = %me, %category, %scope,
            "RBAC does not let this reviewer approve categories/{category} {scope}: its votes count only where a RoleBinding makes it a head"),
        Err(e) => tracing::warn!(%category, error = %e, "could not check whether this reviewer is a head of the category"),
    }
}

async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AgentJobStatus, ApprovalStatus, ApprovalVoteStatus, Approver, CostRange, Estimate, IgnoredVote, TokenRange};
    use serde_json::json;

    fn job(tools: &[&str], images: &[&str], retries: Option<i32>) -> AgentJob {
        let supporting: Vec<_> = images
            .iter()
            .skip(1)
            .enumerate()
            .map(|(i, img)| json!({"name": format!("helper-{i}"), "image": img, "model": "gpt-4o-mini"}))
            .collect();
        let tools: Vec<_> = tools.iter().map(|t| json!({"name": t})).collect();
        let mut spec = json!({
            "category": "core-security",
            "agents": {"primary": {"name": "scanner", "image": images[0], "model": "gpt-4o-mini"}, "supporting": supporting},
            "tools": tools,
            "budget": {"maxCostUSD": "5"},
        });
        if let Some(r) = retries {
            spec["limits"] = json!({"maxRetries": r});
        }
        let mut job: AgentJob = serde_json::from_value(json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
            "metadata": {"name": "scan", "namespace": "team", "uid": "uid-1", "generation": 2},
            "spec": spec,
        }))
        .unwrap();
        job.status = Some(awaiting("0.40", "history"));
        job
    }

    fn awaiting(p90: &str, method: &str) -> AgentJobStatus {
        AgentJobStatus {
            phase: Some(JobPhase::AwaitingApproval),
            observed_generation: Some(2),
            estimate: Some(Estimate {
                generation: 2,
                tokens: TokenRange { p50: 1000, p90: 3000 },
                cost_usd: CostRange { p50: "0.10".into(), p90: p90.into() },
                method: method.into(),
                samples: 3,
                models: vec![],
            }),
            ..AgentJobStatus::default()
        }
    }

    fn policy() -> Policy {
        Policy {
            max_cost: MicroUsd::parse("1.00").unwrap(),
            allowed_tools: Some(vec!["bandit-scanner".into(), "semgrep".into()]),
            allowed_images: Some(vec!["ghcr.io/acme/".into(), "registry.internal/team".into()]),
            max_retries: Some(2),
        }
    }

    enum Want {
        Approve { confidence: i32, mentions: &'static [&'static str] },
        Reject { confidence: i32, mentions: &'static [&'static str] },
        Wait(&'static str),
    }

    struct Case {
        name: &'static str,
        policy: Policy,
        job: AgentJob,
        want: Want,
    }

    fn with_status(mut job: AgentJob, status: AgentJobStatus) -> AgentJob {
        job.status = Some(status);
        job
    }

    fn cases() -> Vec<Case> {
        let scan = || job(&["bandit-scanner"], &["ghcr.io/acme/scanner:2.1"], Some(1));
        vec![
            Case {
                name: "within policy approves and lists what was checked",
                policy: policy(),
                job: scan(),
                want: Want::Approve {
                    confidence: 90,
                    mentions: &[
                        "within review policy",
                        "p90 estimated cost $0.40 within the policy maximum $1.00",
                        "tools bandit-scanner allowed",
                        "images under ghcr.io/acme/",
                        "maxRetries 1 within 2",
                    ],
                },
            },
            Case {
                name: "p90 over the maximum rejects naming both figures",
                policy: policy(),
                job: with_status(scan(), awaiting("1.50", "prior")),
                want: Want::Reject { confidence: 70, mentions: &["p90 estimated cost $1.50 is over the policy maximum $1.00"] },
            },
            Case {
                name: "p90 exactly at the maximum approves",
                policy: policy(),
                job: with_status(scan(), awaiting("1.00", "blend")),
                want: Want::Approve { confidence: 80, mentions: &["$1.00 within the policy maximum $1.00"] },
            },
            Case {
                name: "a disallowed tool rejects naming it",
                policy: policy(),
                job: job(&["bandit-scanner", "shell-exec"], &["ghcr.io/acme/scanner:2.1"], None),
                want: Want::Reject {
                    confidence: 100,
                    mentions: &["tool shell-exec not in the policy's allowedTools [bandit-scanner, semgrep]"],
                },
            },
            Case {
                name: "without allowedTools any tool is fine",
                policy: Policy { allowed_tools: None, ..policy() },
                job: job(&["shell-exec"], &["ghcr.io/acme/scanner:2.1"], None),
                want: Want::Approve { confidence: 90, mentions: &["within review policy"] },
            },
            Case {
                name: "a supporting agent's image outside the prefixes rejects naming it",
                policy: policy(),
                job: job(&[], &["ghcr.io/acme/scanner:2.1", "docker.io/random/fixer:latest"], None),
                want: Want::Reject {
                    confidence: 100,
                    mentions: &["image docker.io/random/fixer:latest (agent helper-0) not under the policy's allowedImages"],
                },
            },
            Case {
                name: "a prefix does not match a longer path segment",
                policy: policy(),
                job: job(&[], &["registry.internal/team-evil/agent:1"], None),
                want: Want::Reject { confidence: 100, mentions: &["image registry.internal/team-evil/agent:1 (agent scanner)"] },
            },
            Case {
                name: "a prefix without a trailing slash matches its own repositories",
                policy: policy(),
                job: job(&[], &["registry.internal/team/agent:1"], None),
                want: Want::Approve { confidence: 90, mentions: &["no tools", "images under"] },
            },
            Case {
                name: "too many retries rejects",
                policy: policy(),
                job: job(&[], &["ghcr.io/acme/scanner:2.1"], Some(5)),
                want: Want::Reject { confidence: 100, mentions: &["maxRetries 5 is over the policy maximum 2"] },
            },
            Case {
                name: "every problem is named at once",
                policy: policy(),
                job: with_status(job(&["shell-exec"], &["quay.io/x/y:1"], None), awaiting("3.00", "history")),
                want: Want::Reject { confidence: 100, mentions: &["$3.00 is over", "tool shell-exec", "image quay.io/x/y:1"] },
            },
            Case {
                name: "no estimate yet means no vote",
                policy: policy(),
                job: with_status(scan(), AgentJobStatus { estimate: None, ..awaiting("0.40", "prior") }),
                want: Want::Wait("no estimate for generation 2 yet"),
            },
            Case {
                name: "an estimate of an older generation means no vote",
                policy: policy(),
                job: with_status(
                    scan(),
                    AgentJobStatus {
                        estimate: Some(Estimate { generation: 1, ..awaiting("0.40", "prior").estimate.unwrap() }),
                        ..awaiting("0.40", "prior")
                    },
                ),
                want: Want::Wait("no estimate for generation 2 yet"),
            },
            Case {
                name: "a job not awaiting approval gets no vote",
                policy: policy(),
                job: with_status(scan(), AgentJobStatus { phase: Some(JobPhase::Running), ..awaiting("0.40", "prior") }),
                want: Want::Wait("job is Running, not AwaitingApproval"),
            },
            Case {
                name: "a job without status gets no vote",
                policy: policy(),
                job: AgentJob { status: None, ..scan() },
                want: Want::Wait("job is Pending"),
            },
        ]
    }

    #[test]
    fn evaluate_table() {
        let cases = cases();
        assert!(cases.len() >= 8);
        for case in cases {
            let name = case.name;
            let got = evaluate(&case.policy, &case.job);
            match (&got, &case.want) {
                (Evaluation::Vote(v), Want::Approve { confidence, mentions })
                | (Evaluation::Vote(v), Want::Reject { confidence, mentions }) => {
                    let want_decision = if matches!(case.want, Want::Approve { .. }) { Decision::Approve } else { Decision::Reject };
                    assert_eq!(v.decision, want_decision, "{name}: {v:?}");
                    assert_eq!(v.confidence, *confidence, "{name}: confidence; {v:?}");
                    for m in *mentions {
                        assert!(v.reason.contains(m), "{name}: reason {:?} should mention {m:?}", v.reason);
                    }
                    assert!(v.reason.len() <= MAX_REASON, "{name}: reason fits the schema");
                }
                (Evaluation::Wait(why), Want::Wait(fragment)) => {
                    assert!(why.contains(fragment), "{name}: waits because {why:?}, want {fragment:?}")
                }
                _ => panic!("{name}: got {got:?}"),
            }
        }
    }

    #[test]
    fn long_reasons_are_cut_to_the_schema_limit() {
        let tools: Vec<String> = (0..100).map(|i| format!("a-rather-long-tool-name-number-{i}")).collect();
        let names: Vec<&str> = tools.iter().map(String::as_str).collect();
        let Evaluation::Vote(v) = evaluate(&policy(), &job(&names, &["ghcr.io/acme/a:1"], None)) else { panic!() };
        assert_eq!(v.decision, Decision::Reject);
        assert!(v.reason.len() <= MAX_REASON && v.reason.ends_with('…'), "{}", v.reason.len());
    }

    #[test]
    fn policy_files() {
        let p = Policy::from_yaml("maxCostUSD: \"1.00\"\nallowedTools: [bandit-scanner]\nallowedImages: [ghcr.io/acme/]\nmaxRetries: 2\n")
            .unwrap();
        assert_eq!(
            p,
            Policy {
                max_cost: MicroUsd(1_000_000),
                allowed_tools: Some(vec!["bandit-scanner".into()]),
                allowed_images: Some(vec!["ghcr.io/acme/".into()]),
                max_retries: Some(2)
            }
        );
        let minimal = Policy::from_yaml("maxCostUSD: \"0.25\"\n").unwrap();
        assert_eq!(minimal, Policy { max_cost: MicroUsd(250_000), allowed_tools: None, allowed_images: None, max_retries: None });
        let errors: &[(&str, &str)] = &[
            ("maxCostUSD: \"lots\"\n", "not a USD amount"),
            ("allowedTools: [x]\n", "maxCostUSD"),
            ("maxCostUSD: \"1\"\nallowedImages: [\"\"]\n", "empty allowedImages prefix"),
            ("maxCostUSD: \"1\"\nallowedtools: [x]\n", "allowedtools"),
            ("maxCostUSD: \"1\"\nmaxRetries: -1\n", "must not be negative"),
        ];
        for (yaml, fragment) in errors {
            let err = Policy::from_yaml(yaml).unwrap_err();
            assert!(err.contains(fragment), "{yaml:?}: {err}");
        }
    }

    #[test]
    fn usernames_become_dns_labels() {
        let cases: &[(&str, &str)] = &[
            ("alice", "alice"),
            ("system:serviceaccount:team-a:reviewer", "sa-team-a-reviewer"),
            ("system:serviceaccount:ns:bot.v2", "sa-ns-bot-v2"),
            ("Alice@Example.com", "alice-example-com"),
            ("oidc:https://idp/#bob", "oidc-https-idp-bob"),
            ("--", "user"),
            ("jörg", "j-rg"),
        ];
        for (user, want) in cases {
            assert_eq!(sanitize_username(user), *want, "{user}");
        }
        let long = "x".repeat(100);
        let label = sanitize_username(&long);
        assert_eq!(label.len(), 63);
        assert_eq!(vote_name("scan-42", "system:serviceaccount:ns:reviewer", 3), "scan-42-sa-ns-reviewer-g3");
        let name = vote_name(&"j".repeat(253), &long, 12);
        assert!(name.len() <= MAX_VOTE_NAME && name.ends_with(&format!("-{label}-g12")), "{name}");
    }

    #[test]
    fn api_errors_say_what_is_missing() {
        let status = |code: u16, message: &str| {
            kube::Error::Api(Box::new(serde_json::from_value(json!({"code": code, "message": message})).unwrap()))
        };
        let rbac = "approvalvotes.agentgate.dev is forbidden: User \"dave\" cannot create resource \"approvalvotes\" in API group \"agentgate.dev\" in the namespace \"team\"";
        let cases: Vec<(kube::Error, &str)> = vec![
            (
                status(403, rbac),
                "forbidden: you may not create approvalvotes.agentgate.dev in namespace team; ask for an RBAC Role (or ClusterRole) and binding that grants verb \"create\" on resource \"approvalvotes\" in API group \"agentgate.dev\"",
            ),
            (
                status(403, "spec.voter must name the user casting the vote"),
                "the apiserver refused the vote: spec.voter must name the user casting the vote",
            ),
            (status(422, "spec.confidence: Invalid value"), "the apiserver refused the vote: spec.confidence"),
            (status(500, "etcd is sad"), "Kubernetes API"),
        ];
        for (error, want) in cases {
            let got = explain(error, "create", "approvalvotes.agentgate.dev", Some("team")).to_string();
            assert!(got.starts_with(want), "{got}");
        }
    }

    fn vote(name: &str, voter: &str, decision: Decision, generation: i64, status: Option<(bool, &str)>) -> ApprovalVote {
        let mut v = ApprovalVote::new(
            name,
            ApprovalVoteSpec {
                job_ref: JobRef { name: "scan".into(), uid: "uid-1".into(), generation },
                voter: voter.into(),
                decision,
                reason: Some(format!("{voter}'s reason")),
                voter_groups: vec![],
                confidence: None,
            },
        );
        v.status = status.map(|(c, m)| ApprovalVoteStatus { counted: Some(c), message: Some(m.into()), observed_generation: Some(1) });
        v
    }

    #[test]
    fn vote_table_prefers_the_jobs_tally() {
        let mut j = job(&[], &["ghcr.io/acme/a:1"], None);
        let approver = |voter: &str, vote: &str| Approver { voter: voter.into(), vote: vote.into(), decided_at: None, reason: None };
        j.status.as_mut().unwrap().approval = Some(ApprovalStatus {
            required: 2,
            approved: 1,
            summary: "1/2".into(),
            approvers: vec![approver("alice", "scan-alice-g2")],
            rejected_by: Some("carol".into()),
            ignored_votes: vec![IgnoredVote {
                name: "scan-bob-g1".into(),
                why: "is for generation 1 but the job is at generation 2; vote again".into(),
            }],
        });
        let votes = vec![
            vote("scan-alice-g2", "alice", Decision::Approve, 2, Some((true, "counted: 1 of 2 approvals"))),
            vote("scan-bob-g1", "bob", Decision::Approve, 1, Some((true, "counted: 1 of 2 approvals"))), // stale status
            vote("scan-carol-g2", "carol", Decision::Reject, 2, None),
            vote("scan-dave-g2", "dave", Decision::Approve, 2, None),
        ];
        let rows = vote_rows(&j, &votes);
        let got: Vec<(&str, &str, &str)> = rows.iter().map(|r| (r.vote.as_str(), r.counted, r.why.as_str())).collect();
        assert_eq!(
            got,
            vec![
                ("scan-alice-g2", "yes", "counted: 1 of 2 approvals"),
                ("scan-bob-g1", "no", "is for generation 1 but the job is at generation 2; vote again"),
                ("scan-carol-g2", "yes", "counted: this Reject rejects the job"),
                ("scan-dave-g2", "pending", "not tallied by the operator yet"),
            ]
        );
        let table = render_votes(&j, &rows);
        assert!(table.contains("Approvals 1/2 (approved by: alice; rejected by: carol)"), "{table}");
        let header = table.lines().find(|l| l.starts_with("VOTE")).unwrap();
        assert!(header.contains("VOTER") && header.contains("COUNTED") && header.contains("WHY"), "{header}");
        let alice = table.lines().find(|l| l.starts_with("scan-alice-g2")).unwrap();
        assert!(alice.contains("alice") && alice.contains("Approve") && alice.contains("yes"), "{alice}");
    }
}
