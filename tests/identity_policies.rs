//! Fail closed without the identity admission policies, against the real apiserver: with any
//! policy binding of deploy/admission/identity.yaml deleted (or weakened to `Warn`), votes that
//! would otherwise count (two heads, claiming their real groups) count for nothing, the job says
//! why (`Approved=False`, reason `IdentityPoliciesMissing`, naming the binding) with a Warning
//! Event, the metric counts the problem and /readyz names it. Restoring the binding makes the
//! same votes count and the job runs. A job created while the author-stamping binding was gone
//! has no author and is never approved (`AuthorUnknown`) until an update records one.
//!
//! One test, because the policies are cluster-wide: bindings (and one policy) are deleted and
//! restored in turn.

mod support;

use std::time::Duration;

use agentgate::api::{AgentJob, ApprovalVote};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingAdmissionPolicy, MutatingAdmissionPolicyBinding, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use support::cluster::*;
use support::controlplane::ControlPlane;
use support::http::{free_port, http_get};

const NS: &str = "identity-policies";
const TIMEOUT: Duration = Duration::from_secs(45);

fn metric(port: u16, name: &str) -> Option<f64> {
    http_get(port, "/metrics").1.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn create_job(client: &Client, name: &str) -> AgentJob {
    create_payments_job(client, NS, name).await
}

/// A vote by `voter` claiming the groups the admission policy would stamp anyway (so without the
/// policy it is exactly as strong as a real one).
async fn head_vote(voter: &str, job: &AgentJob) -> ApprovalVote {
    let vote: ApprovalVote = serde_json::from_value(json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "ApprovalVote", "metadata": {"name": format!("{}-{voter}", job.name_any())},
        "spec": {"jobRef": {"name": job.name_any(), "uid": job.metadata.uid.clone().unwrap(), "generation": 1}, "voter": voter,
                 "decision": "Approve", "voterGroups": ["agentgate:users", "agentgate:heads", "system:authenticated"]}}))
    .unwrap();
    let client = ControlPlane::shared().client(voter).await;
    Api::<ApprovalVote>::namespaced(client, NS).create(&PostParams::default(), &vote).await.expect("create vote")
}

fn approved(job: &AgentJob) -> Option<(String, String)> {
    condition(job, "Approved").map(|c| (c.reason.to_string(), c.message.to_string()))
}

fn approval(job: &AgentJob) -> agentgate::api::ApprovalStatus {
    job.status.as_ref().and_then(|s| s.approval.clone()).unwrap_or_default()
}

/// Waits until both votes on `job` are listed as ignored because of the policies, then checks
/// the job, its Event, the metric and /readyz.
async fn assert_blocked(admin: &Client, job: &str, missing: &str, port: u16) {
    let seen = wait_for_job(admin, NS, job, "both votes voided for the missing policies", |j| {
        approved(j).is_some_and(|(reason, m)| reason == "IdentityPoliciesMissing" && m.contains(missing))
            && approval(j).ignored_votes.iter().filter(|v| v.why.contains("identity admission policies are not in force")).count() == 2
    })
    .await;
    assert_eq!(phase(&seen), Some("AwaitingApproval"), "{job}");
    assert_eq!(approval(&seen).summary, "0/2", "{job}");
    assert_eq!(condition(&seen, "Ready").map(|c| c.reason.as_str()), Some("IdentityPoliciesMissing"), "{job}");
    let events = Api::<Event>::namespaced(admin.clone(), NS);
    let ours = |e: &Event| {
        e.reason.as_deref() == Some("IdentityPoliciesMissing") && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(job)
    };
    let listed = wait_for(
        "an IdentityPoliciesMissing Event on the job",
        TIMEOUT,
        || async { events.list(&ListParams::default()).await.unwrap().items },
        |items: &Vec<Event>| items.iter().any(ours),
    )
    .await;
    let event = listed.into_iter().find(ours).unwrap();
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(event.note.as_deref().is_some_and(|n| n.contains(missing)), "{:?}", event.note);
    assert!(metric(port, "agentgate_identity_policies_missing").is_some_and(|v| v >= 1.0), "metric");
    let (status, body) = http_get(port, "/readyz");
    assert!(status.contains("200"), "/readyz stays ready: {status}");
    assert!(body.contains("no vote counts") && body.contains(missing), "/readyz: {body}");
}

/// Waits until the job runs on its two votes, and nothing says the policies are missing.
async fn assert_counted(admin: &Client, job: &str, port: u16) {
    let running = wait_for_job(admin, NS, job, "Running on two counted votes", |j| phase(j) == Some("Running")).await;
    assert_eq!(approval(&running).summary, "2/2", "{job}");
    assert_eq!(approved(&running).map(|a| a.0), Some("Approved".into()), "{job}");
    assert_eq!(metric(port, "agentgate_identity_policies_missing"), Some(0.0));
    // /readyz turns ready up to 200 ms after the caches sync, which a first job may beat.
    wait_for("/readyz ok", TIMEOUT, || async { http_get(port, "/readyz") }, |r: &(String, String)| r.1 == "ok").await;
}

/// The shipped object as it can be created again (server-set metadata dropped).
fn recreatable<K: kube::Resource + Clone>(obj: &K) -> K {
    let mut o = obj.clone();
    let meta = o.meta_mut();
    meta.resource_version = None;
    meta.uid = None;
    meta.creation_timestamp = None;
    meta.generation = None;
    meta.managed_fields = None;
    o
}

/// Waits until a server-side dry run shows the author-stamping policy acting again (the apiserver
/// loads policies asynchronously).
async fn wait_for_author_stamping(dave: &Client, acting: bool) {
    let jobs = Api::<AgentJob>::namespaced(dave.clone(), NS);
    let probe = agent_job(
        "stamp-probe",
        json!({"category": "payments", "agents": {"primary": {"name": "agent", "image": "a", "model": "gpt-4o-mini"}},
               "budget": {"maxCostUSD": "1"}}),
        json!({}),
    );
    wait_for(
        &format!("author stamping acting: {acting}"),
        TIMEOUT,
        || async { jobs.create(&PostParams { dry_run: true, ..PostParams::default() }, &probe).await.expect("dry run") },
        |j: &AgentJob| j.annotations().contains_key("agentgate.dev/requested-by") == acting,
    )
    .await;
}

#[tokio::test]
async fn votes_count_only_while_every_identity_policy_binding_is_in_force() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let env = Env::builder(NS).node("identity-node", "64", "256Gi", &[]).all_namespaces().metrics_addr(&addr).build().await;
    let (admin, dave, operator) = (env.admin.clone(), env.user("dave").await, env.operator());
    // Tool discovery is opt-in: without --discovery-namespace-selector a labelled Service yields
    // nothing (checked once the baseline job ran, proof that the operator was at work).
    let squat: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "squat", "namespace": NS, "labels": {"agentgate.dev/tool": "ip-web-search"},
                     "annotations": {"agentgate.dev/rate-limit": "10"}},
        "spec": {"ports": [{"port": 80}]}}))
    .unwrap();
    Api::namespaced(admin.clone(), NS).create(&PostParams::default(), &squat).await.expect("create Service");

    // In force: a job on two heads' votes runs.
    let baseline = create_job(&dave, "baseline").await;
    head_vote("alice", &baseline).await;
    head_vote("bob", &baseline).await;
    assert_counted(&admin, "baseline", port).await;
    assert!(Api::<agentgate::api::AgentTool>::all(admin.clone()).get_opt("ip-web-search").await.unwrap().is_none(), "discovery is off");
    let log = std::fs::read_to_string(operator.log_path()).unwrap();
    assert!(log.contains("tool discovery is off"), "the operator says discovery is off");

    let vbindings = Api::<ValidatingAdmissionPolicyBinding>::all(admin.clone());
    let mbindings = Api::<MutatingAdmissionPolicyBinding>::all(admin.clone());

    // Each binding deleted in turn: the votes on a fresh job are voided, then count once restored.
    let validating = vbindings.get("agentgate-approvalvote-identity").await.expect("shipped binding");
    let job = create_job(&dave, "without-voter-check").await;
    vbindings.delete("agentgate-approvalvote-identity", &DeleteParams::default()).await.unwrap();
    head_vote("alice", &job).await;
    head_vote("bob", &job).await;
    assert_blocked(&admin, "without-voter-check", "ValidatingAdmissionPolicyBinding agentgate-approvalvote-identity is missing", port)
        .await;
    vbindings.create(&PostParams::default(), &recreatable(&validating)).await.unwrap();
    assert_counted(&admin, "without-voter-check", port).await;

    // A binding that only warns is no binding.
    let job = create_job(&dave, "voter-check-warns").await;
    vbindings
        .patch("agentgate-approvalvote-identity", &PatchParams::default(), &Patch::Merge(json!({"spec": {"validationActions": ["Warn"]}})))
        .await
        .unwrap();
    head_vote("alice", &job).await;
    head_vote("bob", &job).await;
    assert_blocked(&admin, "voter-check-warns", "spec.validationActions[0] is \"Warn\", agentgate ships \"Deny\"", port).await;
    vbindings
        .patch("agentgate-approvalvote-identity", &PatchParams::default(), &Patch::Merge(json!({"spec": {"validationActions": ["Deny"]}})))
        .await
        .unwrap();
    assert_counted(&admin, "voter-check-warns", port).await;

    let groups = mbindings.get("agentgate-approvalvote-voter-groups").await.expect("shipped binding");
    let job = create_job(&dave, "without-group-stamping").await;
    mbindings.delete("agentgate-approvalvote-voter-groups", &DeleteParams::default()).await.unwrap();
    head_vote("alice", &job).await;
    head_vote("bob", &job).await;
    assert_blocked(&admin, "without-group-stamping", "MutatingAdmissionPolicyBinding agentgate-approvalvote-voter-groups is missing", port)
        .await;
    mbindings.create(&PostParams::default(), &recreatable(&groups)).await.unwrap();
    assert_counted(&admin, "without-group-stamping", port).await;

    // A policy itself deleted (its binding left dangling) is no better.
    let policies = Api::<MutatingAdmissionPolicy>::all(admin.clone());
    let policy = policies.get("agentgate-approvalvote-voter-groups").await.expect("shipped policy");
    let job = create_job(&dave, "without-group-policy").await;
    policies.delete("agentgate-approvalvote-voter-groups", &DeleteParams::default()).await.unwrap();
    head_vote("alice", &job).await;
    head_vote("bob", &job).await;
    assert_blocked(&admin, "without-group-policy", "MutatingAdmissionPolicy agentgate-approvalvote-voter-groups is missing", port).await;
    policies.create(&PostParams::default(), &recreatable(&policy)).await.unwrap();
    assert_counted(&admin, "without-group-policy", port).await;

    // Without the author stamping: a job created meanwhile has no author and never counts votes,
    // even once the binding is back, until an update records its author.
    let author = mbindings.get("agentgate-agentjob-requested-by").await.expect("shipped binding");
    let job = create_job(&dave, "without-author-stamping").await;
    mbindings.delete("agentgate-agentjob-requested-by", &DeleteParams::default()).await.unwrap();
    wait_for_author_stamping(&dave, false).await;
    let unstamped = create_job(&dave, "authorless").await;
    assert!(!unstamped.annotations().contains_key("agentgate.dev/requested-by"));
    for j in [&job, &unstamped] {
        head_vote("alice", j).await;
        head_vote("bob", j).await;
    }
    assert_blocked(&admin, "without-author-stamping", "MutatingAdmissionPolicyBinding agentgate-agentjob-requested-by is missing", port)
        .await;
    mbindings.create(&PostParams::default(), &recreatable(&author)).await.unwrap();
    assert_counted(&admin, "without-author-stamping", port).await;

    let authorless = wait_for_job(&admin, NS, "authorless", "AuthorUnknown", |j| {
        approved(j).is_some_and(|(reason, _)| reason == "AuthorUnknown") && approval(j).ignored_votes.len() == 2
    })
    .await;
    assert_eq!(phase(&authorless), Some("AwaitingApproval"));
    assert_eq!(approval(&authorless).summary, "0/2");
    assert!(approved(&authorless).unwrap().1.contains("no agentgate.dev/requested-by annotation"), "{:?}", approved(&authorless));
    // An update with the policy in force records dave as the author; alice's and bob's votes count.
    wait_for_author_stamping(&dave, true).await;
    let updated = Api::<AgentJob>::namespaced(dave.clone(), NS)
        .patch("authorless", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"reviewed": "yes"}}})))
        .await
        .unwrap();
    assert_eq!(updated.annotations().get("agentgate.dev/requested-by").map(String::as_str), Some("dave"));
    assert_counted(&admin, "authorless", port).await;
}
