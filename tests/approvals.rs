//! Approvals that cannot be forged: identity proven at admission, category heads as an RBAC
//! fact, four eyes, risk tiers and a timeout, against the real apiserver and its admission.

mod support;

use std::time::Duration;

use agentgate::api::{AgentJob, ApprovalVote, Decision};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use support::cluster::*;
use support::controlplane::ControlPlane;

/// Entry point of every test here: the shared [`Env`] with this file's node and `operator_args`.
async fn setup(ns: &str, operator_args: &[&str]) -> Env {
    Env::builder(ns).node("approvals-node", "64", "256Gi", &[]).args(operator_args).build().await
}

async fn user(name: &str) -> Client {
    ControlPlane::shared().client(name).await
}

/// Creates a job as `author`, the way `kubectl apply` by that user would.
async fn create_job_as(env: &Env, author: &str, name: &str, category: &str) -> AgentJob {
    let job = JobManifest::payments(name).category(category).build();
    Api::<AgentJob>::namespaced(user(author).await, &env.ns).create(&PostParams::default(), &job).await.expect("create job")
}

fn approval_of(job: &AgentJob) -> agentgate::api::ApprovalStatus {
    job.status.as_ref().and_then(|s| s.approval.clone()).unwrap_or_default()
}

async fn make_head(admin: &Client, ns: &str, who: &str, category: &str) {
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": format!("agentgate-category-head-{category}")},
        "rules": [{"apiGroups": ["agentgate.dev"], "resources": ["categories"], "verbs": ["approve"], "resourceNames": [category]}]});
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": format!("{who}-heads-{category}"), "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("agentgate-category-head-{category}")},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": who}]});
    let pp = PatchParams::apply("approvals-test").force();
    Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(admin.clone())
        .patch(&format!("agentgate-category-head-{category}"), &pp, &Patch::Apply(&role))
        .await
        .unwrap();
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), ns)
        .patch(&format!("{who}-heads-{category}"), &pp, &Patch::Apply(&binding))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_vote_in_someone_elses_name_is_refused_at_admission_and_votes_never_change() {
    let env = setup("ap-forge", &[]).await;
    let job = create_job_as(&env, "dave", "target", "core-security").await;
    let alice = user("alice").await;
    let forged: ApprovalVote = serde_json::from_value(json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "ApprovalVote", "metadata": {"name": "forged"},
        "spec": {"jobRef": {"name": "target", "uid": job.metadata.uid, "generation": 1}, "voter": "bob", "decision": "Approve",
                 "voterGroups": ["system:masters"]}}))
    .unwrap();
    let votes = Api::<ApprovalVote>::namespaced(alice.clone(), &env.ns);
    match votes.create(&PostParams::default(), &forged).await {
        Err(kube::Error::Api(s)) => assert!(
            s.message.contains("spec.voter must name the user casting the vote: the request comes from alice but spec.voter is bob"),
            "{}",
            s.message
        ),
        other => panic!("a vote in bob's name by alice must be refused, got {other:?}"),
    }

    // An honest vote gets the voter's real groups stamped, whatever the client claimed.
    let honest: ApprovalVote = serde_json::from_value(json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "ApprovalVote", "metadata": {"name": "honest"},
        "spec": {"jobRef": {"name": "target", "uid": job.metadata.uid, "generation": 1}, "voter": "alice", "decision": "Approve",
                 "voterGroups": ["system:masters"]}}))
    .unwrap();
    let created = votes.create(&PostParams::default(), &honest).await.expect("alice votes as alice");
    assert!(!created.spec.voter_groups.contains(&"system:masters".to_string()), "{:?}", created.spec.voter_groups);
    assert!(created.spec.voter_groups.contains(&"agentgate:heads".to_string()), "{:?}", created.spec.voter_groups);

    let as_admin = Api::<ApprovalVote>::namespaced(env.admin.clone(), &env.ns);
    let change = as_admin.patch("honest", &PatchParams::default(), &Patch::Merge(json!({"spec": {"decision": "Reject"}}))).await;
    match change {
        Err(kube::Error::Api(s)) => assert!(s.message.contains("immutable"), "{}", s.message),
        other => panic!("changing a cast vote must be refused, got {other:?}"),
    }
}

#[tokio::test]
async fn the_author_cannot_approve_their_own_job_and_non_heads_do_not_count() {
    let env = setup("ap-four-eyes", &[]).await;
    let job = create_job_as(&env, "alice", "mine", "core-security").await;
    assert_eq!(job.annotations().get("agentgate.dev/requested-by").map(String::as_str), Some("alice"), "author stamped at admission");

    vote(&user("alice").await, &job, "alice", Decision::Approve).await;
    vote(&user("dave").await, &job, "dave", Decision::Approve).await;
    vote(&user("bob").await, &job, "bob", Decision::Approve).await;
    let tallied = wait_for_job(&env.admin, &env.ns, "mine", "three votes tallied", |j| {
        approval_of(j).ignored_votes.len() == 2 && approval_of(j).approvers.len() == 1
    })
    .await;
    let approval = approval_of(&tallied);
    assert_eq!(approval.summary, "1/2");
    assert_eq!(approval.approvers.iter().map(|a| a.voter.as_str()).collect::<Vec<_>>(), vec!["bob"]);
    let why: Vec<&str> = approval.ignored_votes.iter().map(|v| v.why.as_str()).collect();
    assert!(why.iter().any(|w| w.contains("alice created the job and may not approve it")), "{why:?}");
    assert!(why.iter().any(|w| w.contains("dave is not a head of category core-security")), "{why:?}");
    assert_eq!(phase(&tallied), Some("AwaitingApproval"));

    // The votes that do not count say why in their own status; bob's, which counts, is named by
    // the job's status and gets none (its verdict would have been written with the others').
    let votes = Api::<ApprovalVote>::namespaced(env.admin.clone(), &env.ns);
    let listed = wait_for(
        "verdicts of the votes that do not count",
        Duration::from_secs(10),
        || async { votes.list(&Default::default()).await.unwrap().items },
        |vs| vs.iter().filter(|v| v.spec.voter != "bob").all(|v| v.status.as_ref().and_then(|s| s.counted) == Some(false)),
    )
    .await;
    assert_eq!(listed.len(), 3);
    for v in listed {
        match v.spec.voter.as_str() {
            "bob" => assert_eq!(v.status, None, "a counted vote gets no status write"),
            _ => assert!(
                v.status.as_ref().and_then(|s| s.message.as_deref()).is_some_and(|m| !m.is_empty()),
                "{}: {:?}",
                v.name_any(),
                v.status
            ),
        }
    }

    // Someone rewriting the author annotation does not change who the author is.
    Api::<AgentJob>::namespaced(env.admin.clone(), &env.ns)
        .patch(
            "mine",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"agentgate.dev/requested-by": "mallory"}}})),
        )
        .await
        .unwrap();
    let again = Api::<AgentJob>::namespaced(env.admin.clone(), &env.ns).get("mine").await.unwrap();
    assert_eq!(again.annotations().get("agentgate.dev/requested-by").map(String::as_str), Some("alice"));
}

#[tokio::test]
async fn heads_are_an_rbac_fact_and_losing_head_rights_voids_the_vote() {
    let env = setup("ap-rbac", &[]).await;
    make_head(&env.admin, &env.ns, "erin", "ops").await;
    let job = create_job_as(&env, "dave", "deploy", "ops").await;
    let erin_vote = vote(&user("erin").await, &job, "erin", Decision::Approve).await.name_any();
    let counted = wait_for_job(&env.admin, &env.ns, "deploy", "erin counted", |j| approval_of(j).summary == "1/2").await;
    assert_eq!(approval_of(&counted).approvers[0].voter, "erin");

    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(env.admin.clone(), &env.ns)
        .delete("erin-heads-ops", &DeleteParams::default())
        .await
        .unwrap();
    let revoked = wait_for_job(&env.admin, &env.ns, "deploy", "erin no longer counted", |j| approval_of(j).summary == "0/2").await;
    assert!(
        approval_of(&revoked).ignored_votes[0].why.contains("erin is not a head of category ops"),
        "{:?}",
        approval_of(&revoked).ignored_votes
    );
    // A vote that stops counting says why in its own status; counted again, it says so too (a
    // counted vote's status is otherwise left unwritten, so no status may keep saying `false`).
    let votes = Api::<ApprovalVote>::namespaced(env.admin.clone(), &env.ns);
    let said = |counted: bool| {
        let (votes, erin_vote) = (votes.clone(), erin_vote.clone());
        async move {
            wait_for(
                &format!("erin's vote saying counted={counted}"),
                Duration::from_secs(15),
                || async { votes.get(&erin_vote).await.unwrap().status },
                |s: &Option<agentgate::api::ApprovalVoteStatus>| s.as_ref().and_then(|s| s.counted) == Some(counted),
            )
            .await
            .unwrap()
        }
    };
    let voided = said(false).await;
    assert!(voided.message.as_deref().is_some_and(|m| m.contains("erin is not a head of category ops")), "{voided:?}");
    make_head(&env.admin, &env.ns, "erin", "ops").await;
    wait_for_job(&env.admin, &env.ns, "deploy", "erin counted again", |j| approval_of(j).summary == "1/2").await;
    said(true).await;
}

/// A head who gains a way to act as the ServiceAccount that wrote a job stops counting, even when
/// the right is granted in the account's namespace and the job lives in another: cached RBAC
/// answers are dropped per namespace (`access::RbacScope`), and the one that changed here is the
/// account's, not the job's.
#[tokio::test]
async fn a_head_granted_act_as_rights_in_the_writers_namespace_stops_counting() {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let env = setup("ap-act-as-later", &[]).await;
    let builders = "ap-act-as-later-ci";
    ControlPlane::shared().namespace(builders).await;
    let pp = PatchParams::apply("approvals-test").force();
    let account = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "ci"}});
    Api::<ServiceAccount>::namespaced(env.admin.clone(), builders).patch("ci", &pp, &Patch::Apply(&account)).await.unwrap();
    let ci = format!("system:serviceaccount:{builders}:ci");
    let submits = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "ci-submits-jobs"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "test-agentgate-voter"},
        "subjects": [{"kind": "ServiceAccount", "name": "ci", "namespace": builders}]});
    Api::<RoleBinding>::namespaced(env.admin.clone(), &env.ns).patch("ci-submits-jobs", &pp, &Patch::Apply(&submits)).await.unwrap();

    let job = create_payments_job(&impersonating("admin", &ci).await, &env.ns, "built").await;
    assert_eq!(job.annotations().get("agentgate.dev/requested-by"), Some(&ci));
    vote(&user("bob").await, &job, "bob", Decision::Approve).await;
    wait_for_job(&env.admin, &env.ns, "built", "bob counted", |j| approval_of(j).summary == "1/2").await;

    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "sa-impersonator"},
        "rules": [{"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["impersonate"]}]});
    Api::<Role>::namespaced(env.admin.clone(), builders).patch("sa-impersonator", &pp, &Patch::Apply(&role)).await.unwrap();
    let acts = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "bob-acts-as-accounts"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sa-impersonator"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bob"}]});
    Api::<RoleBinding>::namespaced(env.admin.clone(), builders).patch("bob-acts-as-accounts", &pp, &Patch::Apply(&acts)).await.unwrap();
    let voided = wait_for_job(&env.admin, &env.ns, "built", "bob no longer counted", |j| approval_of(j).summary == "0/2").await;
    let why = &approval_of(&voided).ignored_votes[0].why;
    assert!(why.contains(&format!("bob may act as {ci}")), "{why}");
}

#[tokio::test]
async fn a_risk_tier_raises_the_requirement_and_demands_a_human() {
    let env = setup("ap-tier", &["--approval-tier", "minCostUSD=0.000001,required=3,humanGroup=agentgate:humans"]).await;
    make_head(&env.admin, &env.ns, "carol", "core-security").await;
    let job = create_job_as(&env, "dave", "costly", "core-security").await;
    vote(&user("alice").await, &job, "alice", Decision::Approve).await;
    vote(&user("bob").await, &job, "bob", Decision::Approve).await;
    let two = wait_for_job(&env.admin, &env.ns, "costly", "2/3", |j| approval_of(j).summary == "2/3").await;
    let msg = &condition(&two, "Approved").unwrap().message;
    assert!(msg.contains("one must come from a member of agentgate:humans"), "{msg}");
    vote(&user("carol").await, &job, "carol", Decision::Approve).await;
    wait_for_job(&env.admin, &env.ns, "costly", "Running", |j| phase(j) == Some("Running")).await;
}

/// A risk tier is about what a job may spend, and the meters let it spend up to its budget: an
/// author who writes a small job (a tiny estimate) with a large `budget.maxCostUSD` must not slip
/// under the tier and run on two approvals without the human the tier demands.
#[tokio::test]
async fn a_budget_at_a_risk_tier_needs_the_tier_however_small_the_estimate() {
    let env = setup("ap-tier-budget", &["--approval-tier", "minCostUSD=100,required=3,humanGroup=agentgate:humans"]).await;
    make_head(&env.admin, &env.ns, "carol", "payments").await;
    let jobs: Api<AgentJob> = Api::namespaced(user("dave").await, &env.ns);
    let pp = PostParams::default();
    let small = jobs.create(&pp, &JobManifest::payments("small").budget("5").build()).await.expect("create job");
    let large = jobs.create(&pp, &JobManifest::payments("large").budget("500").build()).await.expect("create job");
    for job in [&small, &large] {
        vote(&user("alice").await, job, "alice", Decision::Approve).await;
        vote(&user("bob").await, job, "bob", Decision::Approve).await;
    }
    // The happy path: a budget under the tier runs on the floor's two approvals.
    wait_for_job(&env.admin, &env.ns, "small", "Running", |j| phase(j) == Some("Running")).await;
    let two = wait_for_job(&env.admin, &env.ns, "large", "2 approvals counted", |j| approval_of(j).approved == 2).await;
    let p90 = two.status.as_ref().and_then(|s| s.estimate.as_ref()).map(|e| e.cost_usd.p90.clone()).unwrap_or_default();
    assert!(p90.parse::<f64>().is_ok_and(|c| c < 100.0), "the estimate is under the tier: {p90}");
    assert_eq!((phase(&two), approval_of(&two).summary.as_str()), (Some("AwaitingApproval"), "2/3"), "{:?}", two.status);
    let msg = &condition(&two, "Approved").unwrap().message;
    assert!(msg.contains("one must come from a member of agentgate:humans") && msg.contains("budget"), "{msg}");
    vote(&user("carol").await, &large, "carol", Decision::Approve).await;
    wait_for_job(&env.admin, &env.ns, "large", "Running", |j| phase(j) == Some("Running")).await;
}

#[tokio::test]
async fn a_job_waiting_too_long_for_approval_is_rejected() {
    let env = setup("ap-timeout", &["--approval-timeout-seconds", "2"]).await;
    create_job_as(&env, "dave", "forgotten", "core-security").await;
    let job = wait_for_job(&env.admin, &env.ns, "forgotten", "Rejected", |j| phase(j) == Some("Rejected")).await;
    let ready = condition(&job, "Ready").unwrap();
    assert_eq!(ready.reason, "ApprovalTimeout");
    assert!(ready.message.contains("no approval within 2s"), "{}", ready.message);
}
