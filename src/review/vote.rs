//! Who am I, what a vote is named, and casting one: shared by the plugin and the reviewer.

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};

use crate::api::{AgentJob, ApprovalVote, ApprovalVoteSpec, Decision, JobRef};

/// The schema's limit on `spec.reason`.
pub(super) const MAX_REASON: usize = 1024;
/// Longest vote name we choose, leaving room for the 5 characters `generateName` appends
/// within the 253 a name may have.
const MAX_VOTE_NAME: usize = 240;

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

pub(super) fn truncate_reason(reason: String) -> String {
    if reason.len() <= MAX_REASON {
        return reason;
    }
    let mut end = MAX_REASON - '…'.len_utf8();
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
