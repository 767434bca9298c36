//! Attacks on the approval count, against the real apiserver, its admission policies and RBAC:
//! a forged voter or forged groups, self-approval, a vote replayed after a spec change or onto a
//! deleted-and-recreated job of the same name, a non-head's vote, and a vote by someone who is a
//! head only in another namespace. None may count, and each says why in the vote's status and
//! in the job's `status.approval.ignoredVotes`.
//!
//! Every job needs two approvals (the operator's default floor); alice and bob are heads of every
//! category cluster-wide, dave and erin are not (erin is one in another namespace only).

mod support;

use std::time::Duration;

use agentgate::api::{AgentJob, ApprovalVote, ApprovalVoteStatus, Decision};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::cluster::*;
use support::controlplane::ControlPlane;

const TIMEOUT: Duration = Duration::from_secs(30);

/// The namespace, a node and voting rights, served by one operator for every test here,
/// watching all namespaces.
async fn setup(ns: &str) -> Client {
    Env::builder(ns).node("vote-attacks-node", "64", "256Gi", &[]).operator(OperatorMode::Shared).build().await.admin
}

async fn user(name: &str) -> Client {
    ControlPlane::shared().client(name).await
}

/// A job created by `author` (the admission policy stamps them as its requester).
async fn create_job(author: &str, ns: &str, name: &str) -> AgentJob {
    create_payments_job(&user(author).await, ns, name).await
}

fn vote_object(name: &str, job_name: &str, uid: &str, generation: i64, voter: &str, groups: Value) -> ApprovalVote {
    serde_json::from_value(json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "ApprovalVote", "metadata": {"name": name},
        "spec": {"jobRef": {"name": job_name, "uid": uid, "generation": generation}, "voter": voter, "decision": "Approve",
                 "voterGroups": groups}}))
    .unwrap()
}

fn approval(job: &AgentJob) -> agentgate::api::ApprovalStatus {
    job.status.as_ref().and_then(|s| s.approval.clone()).unwrap_or_default()
}

/// Waits until the job lists `vote` among its ignored votes, then checks that the job still
/// awaits approval with `approved` counted votes and that both the job and the vote's own status
/// give `why`.
async fn assert_not_counted(admin: &Client, ns: &str, job: &str, vote: &str, approved: i32, why: &str) {
    let seen = wait_for_job(admin, ns, job, &format!("vote {vote} ignored"), |j| {
        approval(j).ignored_votes.iter().any(|v| v.name == vote) && approval(j).approved == approved
    })
    .await;
    let ignored = approval(&seen).ignored_votes.into_iter().find(|v| v.name == vote).unwrap();
    assert!(ignored.why.contains(why), "job {job}: vote {vote} ignored because {:?}, want {why:?}", ignored.why);
    assert_eq!(phase(&seen), Some("AwaitingApproval"), "job {job}");
    assert_eq!(approval(&seen).summary, format!("{approved}/2"), "job {job}");
    assert!(approval(&seen).approvers.iter().all(|a| a.vote != vote), "job {job}: {vote} among the approvers");

    // The vote's verdict is written after the job's status, and a vote may still show the verdict
    // it got on an earlier job: wait for the one that gives this reason.
    let votes: Api<ApprovalVote> = Api::namespaced(admin.clone(), ns);
    let status = wait_for(
        &format!("status of vote {vote} giving {why:?}"),
        TIMEOUT,
        || async { votes.get(vote).await.expect("get vote").status },
        |s: &Option<ApprovalVoteStatus>| s.as_ref().and_then(|s| s.message.as_deref()).is_some_and(|m| m.contains(why)),
    )
    .await
    .unwrap();
    assert_eq!(status.counted, Some(false), "vote {vote}: {:?}", status.message);
}

#[tokio::test]
async fn a_forged_voter_is_refused_and_forged_groups_are_replaced() {
    let ns = "va-forged";
    let admin = setup(ns).await;
    let job = create_job("admin", ns, "target").await;
    let uid = job.metadata.uid.clone().unwrap();

    // dave, no head, casts a vote in alice's name: refused at admission, nothing to count.
    let as_dave = Api::<ApprovalVote>::namespaced(user("dave").await, ns);
    match as_dave.create(&PostParams::default(), &vote_object("in-alices-name", "target", &uid, 1, "alice", json!([]))).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{}", s.message);
            assert!(s.message.contains("the request comes from dave but spec.voter is alice"), "{}", s.message);
        }
        other => panic!("a vote in alice's name by dave must be refused, got {other:?}"),
    }
    // A look-alike name (Cyrillic а) is another name, and refused just the same.
    let homoglyph = as_dave.create(&PostParams::default(), &vote_object("lookalike", "target", &uid, 1, "\u{0430}lice", json!([]))).await;
    assert!(matches!(homoglyph, Err(kube::Error::Api(ref s)) if s.code == 403), "{homoglyph:?}");

    // dave votes as himself but claims the heads' group and cluster-admin: admission replaces
    // the groups with his real ones, so the head check sees only what dave is.
    let forged_groups =
        vote_object("dave-claims-groups", "target", &uid, 1, "dave", json!(["agentgate:heads", "system:masters", "system:nodes"]));
    let created = as_dave.create(&PostParams::default(), &forged_groups).await.expect("dave may vote as dave");
    let groups = &created.spec.voter_groups;
    for claimed in ["agentgate:heads", "system:masters", "system:nodes"] {
        assert!(!groups.iter().any(|g| g == claimed), "claimed group {claimed} kept: {groups:?}");
    }
    assert!(groups.iter().any(|g| g == "agentgate:users"), "{groups:?}");
    assert_not_counted(&admin, ns, "target", "dave-claims-groups", 0, "dave is not a head of category payments").await;

    // Nor can anyone rewrite the groups (or anything else) of a cast vote.
    let rewrite = Api::<ApprovalVote>::namespaced(admin.clone(), ns)
        .patch("dave-claims-groups", &PatchParams::default(), &Patch::Merge(json!({"spec": {"voterGroups": ["agentgate:heads"]}})))
        .await;
    assert!(matches!(rewrite, Err(kube::Error::Api(ref s)) if s.message.contains("immutable")), "{rewrite:?}");
}

#[tokio::test]
async fn the_author_cannot_approve_their_own_job() {
    let ns = "va-self";
    let admin = setup(ns).await;
    // alice is a head of every category, but this is her own job.
    let job = create_job("alice", ns, "mine").await;
    vote(&user("alice").await, &job, "alice", Decision::Approve).await;
    let name = wait_for(
        "alice's vote",
        TIMEOUT,
        || async { Api::<ApprovalVote>::namespaced(admin.clone(), ns).list(&Default::default()).await.unwrap().items },
        |v: &Vec<ApprovalVote>| v.len() == 1,
    )
    .await[0]
        .name_any();
    assert_not_counted(&admin, ns, "mine", &name, 0, "alice created the job and may not approve it").await;
    // bob's approval counts; alice's still does not make it two.
    vote(&user("bob").await, &job, "bob", Decision::Approve).await;
    let one = wait_for_job(&admin, ns, "mine", "bob counted", |j| approval(j).approved == 1).await;
    assert_eq!(phase(&one), Some("AwaitingApproval"));
    assert_eq!(approval(&one).approvers.iter().map(|a| a.voter.as_str()).collect::<Vec<_>>(), ["bob"]);
}

/// A head who rewrites someone else's job wrote what they would approve: their vote is no more
/// an independent review than the author's. Without this, bob edits dave's job (a new budget,
/// image or input) and approves it himself, and one more head makes two approvals of a spec only
/// one other person reviewed, where a job bob created would need two heads besides him.
#[tokio::test]
async fn a_head_who_changed_the_spec_cannot_approve_it() {
    let ns = "va-spec-editor";
    let admin = setup(ns).await;
    create_job("dave", ns, "rewritten").await;
    let as_bob = Api::<AgentJob>::namespaced(user("bob").await, ns);
    let edited = as_bob
        .patch("rewritten", &PatchParams::default(), &Patch::Merge(json!({"spec": {"budget": {"maxCostUSD": "500"}}})))
        .await
        .expect("bob may edit jobs in the namespace");
    assert_eq!(edited.metadata.generation, Some(2));

    let bob_vote = vote(&user("bob").await, &edited, "bob", Decision::Approve).await.name_any();
    let alice_vote = vote(&user("alice").await, &edited, "alice", Decision::Approve).await.name_any();
    let tallied = wait_for_job(&admin, ns, "rewritten", "both votes tallied", |j| {
        let a = approval(j);
        let seen = |vote: &str| a.approvers.iter().any(|x| x.vote == vote) || a.ignored_votes.iter().any(|x| x.name == vote);
        seen(&bob_vote) && seen(&alice_vote)
    })
    .await;
    assert_eq!(phase(&tallied), Some("AwaitingApproval"), "bob's own edit approved by bob and alice: {:?}", approval(&tallied));
    assert_eq!(approval(&tallied).approvers.iter().map(|a| a.voter.as_str()).collect::<Vec<_>>(), ["alice"]);
    assert_not_counted(&admin, ns, "rewritten", &bob_vote, 1, "bob changed the job's spec and may not approve it").await;

    // Admission records him (the author stays dave), and he cannot wash his name out with a
    // metadata-only update: it is restored like the author's.
    assert_eq!(edited.annotations().get("agentgate.dev/requested-by").map(String::as_str), Some("dave"));
    assert_eq!(edited.annotations().get("agentgate.dev/spec-edited-by").map(String::as_str), Some("bob"));
    let scrubbed = as_bob
        .patch(
            "rewritten",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"agentgate.dev/spec-edited-by": null}}})),
        )
        .await
        .expect("a metadata-only update is allowed");
    assert_eq!(scrubbed.annotations().get("agentgate.dev/spec-edited-by").map(String::as_str), Some("bob"));
    assert_eq!(scrubbed.metadata.generation, Some(2));
}

/// The namespace's `edit` role lets every tenant act as its ServiceAccounts (it grants
/// `impersonate` on serviceaccounts; minting their tokens or running a Pod as one does the same).
/// A head who may act as the account that created or changed a job wrote it as far as review
/// goes: without this, bob submits a job as the namespace's CI account (or rewrites dave's job
/// as it, so that admission records the account, not him) and approves it himself, and alice
/// makes two approvals of a spec only she reviewed.
#[tokio::test]
async fn a_head_who_may_act_as_the_service_account_that_wrote_the_job_cannot_approve_it() {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let ns = "va-act-as";
    let admin = setup(ns).await;
    let ci = format!("system:serviceaccount:{ns}:ci");
    let pp = PatchParams::apply("vote-attacks").force();
    let account = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "ci"}});
    Api::<ServiceAccount>::namespaced(admin.clone(), ns).patch("ci", &pp, &Patch::Apply(&account)).await.unwrap();
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "sa-impersonator"},
        "rules": [{"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["impersonate"]}]});
    Api::<Role>::namespaced(admin.clone(), ns).patch("sa-impersonator", &pp, &Patch::Apply(&role)).await.unwrap();
    let bindings = [
        ("ci-submits-jobs", "ClusterRole", "test-agentgate-voter", json!({"kind": "ServiceAccount", "name": "ci", "namespace": ns})),
        (
            "bob-acts-as-accounts",
            "Role",
            "sa-impersonator",
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bob"}),
        ),
    ];
    for (name, kind, role, subject) in bindings {
        let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role}, "subjects": [subject]});
        Api::<RoleBinding>::namespaced(admin.clone(), ns).patch(name, &pp, &Patch::Apply(&binding)).await.unwrap();
    }
    let as_ci = impersonating("bob", &ci).await;

    // Created as the account: admission stamps it, not bob, as the requester.
    let submitted = create_payments_job(&as_ci, ns, "submitted").await;
    assert_eq!(submitted.annotations().get("agentgate.dev/requested-by"), Some(&ci));
    // dave's job rewritten as the account: admission records it, not bob, as an editor.
    create_job("dave", ns, "rewritten").await;
    let rewritten = Api::<AgentJob>::namespaced(as_ci, ns)
        .patch("rewritten", &PatchParams::default(), &Patch::Merge(json!({"spec": {"budget": {"maxCostUSD": "500"}}})))
        .await
        .expect("the account may edit jobs");
    assert_eq!(rewritten.annotations().get("agentgate.dev/spec-edited-by"), Some(&ci));

    for job in [&submitted, &rewritten] {
        let name = job.name_any();
        let bob_vote = vote(&user("bob").await, job, "bob", Decision::Approve).await.name_any();
        let alice_vote = vote(&user("alice").await, job, "alice", Decision::Approve).await.name_any();
        let tallied = wait_for_job(&admin, ns, &name, "both votes tallied", |j| {
            let a = approval(j);
            let seen = |vote: &str| a.approvers.iter().any(|x| x.vote == vote) || a.ignored_votes.iter().any(|x| x.name == vote);
            seen(&bob_vote) && seen(&alice_vote)
        })
        .await;
        assert_eq!(phase(&tallied), Some("AwaitingApproval"), "{name}: bob approved as himself what he wrote as {ci}");
        assert_eq!(approval(&tallied).approvers.iter().map(|a| a.voter.as_str()).collect::<Vec<_>>(), ["alice"], "{name}");
        assert_not_counted(&admin, ns, &name, &bob_vote, 1, &format!("bob may act as {ci}")).await;
    }
}

/// A head who may impersonate a colleague (`impersonate` on `users`, her name) submits a job as
/// her (`kubectl --as=carol`: admission records carol as its author) and approves it himself:
/// the job would run on one independent head. His vote must not count; alice's, who has no such
/// right, still does.
#[tokio::test]
async fn a_head_who_may_impersonate_the_jobs_author_cannot_approve_it() {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
    let ns = "va-impersonate-author";
    let admin = setup(ns).await;
    let pp = PatchParams::apply("vote-attacks").force();
    // Cluster-wide, as user impersonation only can be; carol writes no other job in this file.
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "va-impersonates-carol"},
        "rules": [{"apiGroups": [""], "resources": ["users"], "resourceNames": ["carol"], "verbs": ["impersonate"]}]});
    Api::<ClusterRole>::all(admin.clone()).patch("va-impersonates-carol", &pp, &Patch::Apply(&role)).await.unwrap();
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "va-bob-impersonates-carol"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "va-impersonates-carol"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bob"}]});
    Api::<ClusterRoleBinding>::all(admin.clone()).patch("va-bob-impersonates-carol", &pp, &Patch::Apply(&binding)).await.unwrap();
    // Impersonated without her groups, carol is only authenticated: let her user submit jobs here.
    let submits = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "carol-submits-jobs"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "test-agentgate-voter"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "carol"}]});
    Api::<RoleBinding>::namespaced(admin.clone(), ns).patch("carol-submits-jobs", &pp, &Patch::Apply(&submits)).await.unwrap();

    // The right is real: the apiserver lets bob write the job as carol, and admission records her.
    let job = create_payments_job(&impersonating("bob", "carol").await, ns, "as-carol").await;
    assert_eq!(job.annotations().get("agentgate.dev/requested-by").map(String::as_str), Some("carol"));
    let bob_vote = vote(&user("bob").await, &job, "bob", Decision::Approve).await.name_any();
    let alice_vote = vote(&user("alice").await, &job, "alice", Decision::Approve).await.name_any();
    let tallied = wait_for_job(&admin, ns, "as-carol", "both votes tallied", |j| {
        let a = approval(j);
        let seen = |vote: &str| a.approvers.iter().any(|x| x.vote == vote) || a.ignored_votes.iter().any(|x| x.name == vote);
        seen(&bob_vote) && seen(&alice_vote)
    })
    .await;
    assert_eq!(phase(&tallied), Some("AwaitingApproval"), "bob approved what he wrote as carol");
    assert_eq!(approval(&tallied).approvers.iter().map(|a| a.voter.as_str()).collect::<Vec<_>>(), ["alice"]);
    assert_not_counted(&admin, ns, "as-carol", &bob_vote, 1, "bob may act as carol").await;
}

/// `create` on any workload controller of a namespace runs a Pod there as any of its
/// ServiceAccounts (the controller makes the Pod, with the template's `serviceAccountName`), so
/// a custom role granting only that lets its holder write a job as the account as surely as
/// `create pods` does. Each such role alone must make a head's vote on the account's job not
/// count; a head without it (alice) still counts.
#[tokio::test]
async fn a_head_who_may_create_workloads_that_run_as_the_jobs_service_account_cannot_approve_it() {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    let pod_template = json!({"spec": {"serviceAccountName": "ci", "restartPolicy": "Never",
        "containers": [{"name": "c", "image": "ghcr.io/bob/steal-token:1"}]}});
    let workloads = [
        (
            "va-act-as-deploy",
            "apps",
            "Deployment",
            "deployments",
            json!({"selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"serviceAccountName": "ci", "containers": pod_template["spec"]["containers"]}}}),
        ),
        (
            "va-act-as-cronjob",
            "batch",
            "CronJob",
            "cronjobs",
            json!({"schedule": "* * * * *",
            "jobTemplate": {"spec": {"template": pod_template}}}),
        ),
    ];
    for (ns, group, kind, resource, spec) in workloads {
        let admin = setup(ns).await;
        let ci = format!("system:serviceaccount:{ns}:ci");
        let pp = PatchParams::apply("vote-attacks").force();
        let account = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "ci"}});
        Api::<ServiceAccount>::namespaced(admin.clone(), ns).patch("ci", &pp, &Patch::Apply(&account)).await.unwrap();
        let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "workload-creator"},
            "rules": [{"apiGroups": [group], "resources": [resource], "verbs": ["create"]}]});
        Api::<Role>::namespaced(admin.clone(), ns).patch("workload-creator", &pp, &Patch::Apply(&role)).await.unwrap();
        let bindings = [
            ("ci-submits-jobs", "ClusterRole", "test-agentgate-voter", json!({"kind": "ServiceAccount", "name": "ci", "namespace": ns})),
            (
                "bob-creates-workloads",
                "Role",
                "workload-creator",
                json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bob"}),
            ),
        ];
        for (name, role_kind, role, subject) in bindings {
            let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role}, "subjects": [subject]});
            Api::<RoleBinding>::namespaced(admin.clone(), ns).patch(name, &pp, &Patch::Apply(&binding)).await.unwrap();
        }
        // The role is enough to run a Pod as the account: the apiserver admits bob's workload.
        let gvk = GroupVersionKind::gvk(group, "v1", kind);
        let workload: DynamicObject = serde_json::from_value(json!({"apiVersion": format!("{group}/v1"), "kind": kind,
            "metadata": {"name": "as-ci"}, "spec": spec}))
        .unwrap();
        Api::<DynamicObject>::namespaced_with(user("bob").await, ns, &ApiResource::from_gvk(&gvk))
            .create(&PostParams { dry_run: true, ..PostParams::default() }, &workload)
            .await
            .unwrap_or_else(|e| panic!("{ns}: bob may create a {kind} running as {ci}: {e}"));

        let job = create_payments_job(&impersonating("admin", &ci).await, ns, "submitted").await;
        assert_eq!(job.annotations().get("agentgate.dev/requested-by"), Some(&ci));
        let bob_vote = vote(&user("bob").await, &job, "bob", Decision::Approve).await.name_any();
        let alice_vote = vote(&user("alice").await, &job, "alice", Decision::Approve).await.name_any();
        let tallied = wait_for_job(&admin, ns, "submitted", "both votes tallied", |j| {
            let a = approval(j);
            let seen = |vote: &str| a.approvers.iter().any(|x| x.vote == vote) || a.ignored_votes.iter().any(|x| x.name == vote);
            seen(&bob_vote) && seen(&alice_vote)
        })
        .await;
        assert_eq!(phase(&tallied), Some("AwaitingApproval"), "{ns}: bob approved what he may write as {ci} through a {kind}");
        assert_eq!(approval(&tallied).approvers.iter().map(|a| a.voter.as_str()).collect::<Vec<_>>(), ["alice"], "{ns}");
        assert_not_counted(&admin, ns, "submitted", &bob_vote, 1, &format!("bob may act as {ci}")).await;
        assert_not_counted(&admin, ns, "submitted", &bob_vote, 1, &format!("create {resource}")).await;
    }
}

#[tokio::test]
async fn a_vote_does_not_carry_over_a_spec_change() {
    let ns = "va-spec-change";
    let admin = setup(ns).await;
    let job = create_job("dave", ns, "scan").await;
    let old_vote = vote(&user("alice").await, &job, "alice", Decision::Approve).await.name_any();
    wait_for_job(&admin, ns, "scan", "alice counted on generation 1", |j| approval(j).approved == 1).await;

    // The author raises the budget after alice looked: generation 2 is a job alice never saw.
    let changed = Api::<AgentJob>::namespaced(user("dave").await, ns)
        .patch("scan", &PatchParams::default(), &Patch::Merge(json!({"spec": {"budget": {"maxCostUSD": "500"}}})))
        .await
        .expect("dave edits his job");
    assert_eq!(changed.metadata.generation, Some(2));
    assert_not_counted(&admin, ns, "scan", &old_vote, 0, "is for generation 1 but the job is at generation 2; vote again").await;

    // bob's vote on generation 2 counts; alice's replay does not join it.
    vote(&user("bob").await, &changed, "bob", Decision::Approve).await;
    let one = wait_for_job(&admin, ns, "scan", "bob counted on generation 2", |j| approval(j).approved == 1).await;
    assert_eq!(approval(&one).approvers[0].voter, "bob");
    assert_eq!(phase(&one), Some("AwaitingApproval"));
}

#[tokio::test]
async fn a_vote_does_not_carry_over_to_a_recreated_job_of_the_same_name() {
    let ns = "va-recreate";
    let admin = setup(ns).await;
    let first = create_job("dave", ns, "deploy").await;
    let alice_vote = vote(&user("alice").await, &first, "alice", Decision::Approve).await.name_any();
    let bob_vote = vote(&user("bob").await, &first, "bob", Decision::Approve).await.name_any();
    wait_for_job(&admin, ns, "deploy", "the first job approved", |j| approval(j).approved == 2).await;

    let jobs = Api::<AgentJob>::namespaced(admin.clone(), ns);
    jobs.delete("deploy", &DeleteParams::default()).await.expect("delete job");
    wait_for("the first job gone", TIMEOUT, || async { jobs.get_opt("deploy").await.unwrap() }, |j| j.is_none()).await;
    // Same name, same generation 1, different content: the two approvals were for the old one.
    let second = create_job("dave", ns, "deploy").await;
    assert_ne!(second.metadata.uid, first.metadata.uid);
    assert_eq!(second.metadata.generation, Some(1));
    let why = format!("is for another job named deploy (uid {}), not this one", first.metadata.uid.as_deref().unwrap());
    assert_not_counted(&admin, ns, "deploy", &alice_vote, 0, &why).await;
    assert_not_counted(&admin, ns, "deploy", &bob_vote, 0, &why).await;
}

#[tokio::test]
async fn a_non_heads_vote_does_not_count() {
    let ns = "va-non-head";
    let admin = setup(ns).await;
    let job = create_job("admin", ns, "report").await;
    let dave_vote = vote(&user("dave").await, &job, "dave", Decision::Approve).await.name_any();
    assert_not_counted(&admin, ns, "report", &dave_vote, 0, "dave is not a head of category payments").await;
    // Nor does a non-head's Reject reject.
    let erin_vote = vote(&user("erin").await, &job, "erin", Decision::Reject).await.name_any();
    assert_not_counted(&admin, ns, "report", &erin_vote, 0, "erin is not a head of category payments").await;
}

#[tokio::test]
async fn a_head_of_another_namespace_does_not_count_here() {
    let ns = "va-here";
    let elsewhere = "va-elsewhere";
    let admin = setup(ns).await;
    ControlPlane::shared().namespace(elsewhere).await;
    // erin heads every category, but only in `elsewhere`.
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "erin-heads-elsewhere", "namespace": elsewhere},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "test-agentgate-head-of-every-category"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "erin"}]});
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), elsewhere)
        .patch("erin-heads-elsewhere", &PatchParams::apply("vote-attacks").force(), &Patch::Apply(&binding))
        .await
        .expect("bind erin as a head in the other namespace");

    let job = create_job("dave", ns, "transfer").await;
    let erin_vote = vote(&user("erin").await, &job, "erin", Decision::Approve).await.name_any();
    assert_not_counted(
        &admin,
        ns,
        "transfer",
        &erin_vote,
        0,
        "erin is not a head of category payments: RBAC does not allow them to approve categories/payments in va-here",
    )
    .await;

    // A vote cast in the other namespace, naming this job's name and uid, is not a vote on it:
    // votes count only in their job's namespace.
    let uid = job.metadata.uid.clone().unwrap();
    Api::<ApprovalVote>::namespaced(user("erin").await, elsewhere)
        .create(&PostParams::default(), &vote_object("from-elsewhere", "transfer", &uid, 1, "erin", json!([])))
        .await
        .expect("erin may vote in her namespace");
    let bob_vote = vote(&user("bob").await, &job, "bob", Decision::Approve).await.name_any();
    let tallied = wait_for_job(&admin, ns, "transfer", "bob counted", |j| approval(j).approved == 1).await;
    assert_eq!(approval(&tallied).approvers.iter().map(|a| a.vote.as_str()).collect::<Vec<_>>(), [bob_vote.as_str()]);
    assert!(approval(&tallied).ignored_votes.iter().all(|v| v.name != "from-elsewhere"), "{:?}", approval(&tallied).ignored_votes);
    assert_eq!(phase(&tallied), Some("AwaitingApproval"), "one head from here and one from elsewhere are not two approvals");
    let foreign = Api::<ApprovalVote>::namespaced(admin.clone(), elsewhere).get("from-elsewhere").await.unwrap();
    assert_ne!(foreign.status.and_then(|s| s.counted), Some(true), "a vote in another namespace never counts");
}

/// The reasons of the Events on `job` (by uid), oldest first.
async fn event_reasons(admin: &Client, ns: &str, job: &AgentJob) -> Vec<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), ns);
    let mut items = events.list(&Default::default()).await.expect("list events").items;
    items.retain(|e| e.regarding.as_ref().and_then(|r| r.uid.as_ref()) == job.metadata.uid.as_ref());
    items.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    items.into_iter().filter_map(|e| e.reason).collect()
}

/// A new job's first wait for votes gets no Event (its status says it), and its first status
/// waits a moment for votes applied with it. Neither hides anything a tenant would want hidden:
/// a forged vote applied with the job is listed as not counted in the first status and in its
/// own, and a head's Reject applied with the job is written at once, with its Warning Event.
/// (Only counted approvals extend the wait: decide/tests.rs
/// approvals_still_arriving_extend_the_first_status_wait_up_to_a_bound.)
#[tokio::test]
async fn the_quiet_first_wait_for_votes_hides_no_forged_vote_and_no_rejection() {
    let ns = "va-quiet-wait";
    let admin = setup(ns).await;

    // A forged vote (dave is no head) and one real approval, applied with the job.
    let job = create_job("admin", ns, "quiet").await;
    let dave_vote = vote(&user("dave").await, &job, "dave", Decision::Approve).await.name_any();
    vote(&user("alice").await, &job, "alice", Decision::Approve).await;
    assert_not_counted(&admin, ns, "quiet", &dave_vote, 1, "dave is not a head of category payments").await;
    // bob completes the approvals; the AttemptStarted Event proves the operator has reported.
    vote(&user("bob").await, &job, "bob", Decision::Approve).await;
    wait_for_job(&admin, ns, "quiet", "Running", |j| phase(j) == Some("Running")).await;
    let reasons = wait_for(
        "the AttemptStarted Event",
        TIMEOUT,
        || event_reasons(&admin, ns, &job),
        |r: &Vec<String>| r.iter().any(|r| r == "AttemptStarted"),
    )
    .await;
    assert!(!reasons.iter().any(|r| r == "AwaitingApproval"), "no Event for the first wait: {reasons:?}");

    // A head's Reject applied with the job: Rejected at once, said in a Warning Event.
    let vetoed = create_job("admin", ns, "vetoed").await;
    vote(&user("alice").await, &vetoed, "alice", Decision::Approve).await;
    vote(&user("bob").await, &vetoed, "bob", Decision::Reject).await;
    let rejected = wait_for_job(&admin, ns, "vetoed", "Rejected", |j| phase(j) == Some("Rejected")).await;
    assert_eq!(approval(&rejected).rejected_by.as_deref(), Some("bob"));
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), ns);
    let warned = wait_for(
        "the VoteRejected Warning",
        TIMEOUT,
        || async { events.list(&Default::default()).await.expect("list events").items },
        |items: &Vec<k8s_openapi::api::events::v1::Event>| {
            items.iter().any(|e| {
                e.reason.as_deref() == Some("VoteRejected")
                    && e.type_.as_deref() == Some("Warning")
                    && e.regarding.as_ref().and_then(|r| r.uid.as_ref()) == vetoed.metadata.uid.as_ref()
            })
        },
    )
    .await;
    assert!(warned.iter().any(|e| e.note.as_deref().is_some_and(|n| n.contains("bob rejected the job"))), "{warned:?}");
}
