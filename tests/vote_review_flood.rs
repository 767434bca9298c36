//! One tenant's ServiceAccount votes against the operator's SubjectAccessReviews: a head who may
//! create ServiceAccounts and RoleBindings in their namespace binds the head role to many of
//! them and has each vote on a job. None of those votes can count (none is a trusted robot,
//! `--robot-voters`), so none may cost a review: before, each cost a head check, and each other
//! voter was asked whether they may act as it (up to 27 reviews a pair), one after another in the
//! reconcile. Counted by the apiserver itself (`apiserver_request_total`), in its own test binary
//! so that no other test's reviews are counted; another team's job is approved meanwhile.

mod support;

use std::time::{Duration, Instant};

use agentgate::api::{AgentJob, ApprovalVote, Decision};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;
use support::cluster::*;

const TENANT: &str = "vrf-tenant";
const OTHER: &str = "vrf-other";
const SOCKS: usize = 60;

fn approval(job: &AgentJob) -> agentgate::api::ApprovalStatus {
    job.status.as_ref().and_then(|s| s.approval.clone()).unwrap_or_default()
}

/// SubjectAccessReviews the apiserver has served so far, by its own metrics.
async fn access_reviews(admin: &Client) -> u64 {
    let text = admin.request_text(http::Request::get("/metrics").body(Vec::new()).unwrap()).await.unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{") && l.contains("resource=\"subjectaccessreviews\"") && l.contains("verb=\"POST\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// How many votes the job's status has judged and not counted: those listed, and the rest the
/// "(more)" line counts.
fn ignored_count(job: &AgentJob) -> usize {
    approval(job)
        .ignored_votes
        .iter()
        .map(|v| if v.name == "(more)" { v.why.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0) } else { 1 })
        .sum()
}

/// Polls `get` until `done` holds or a minute has passed, and returns the last value either way:
/// a flood that stalls the reconcile must still report how many reviews it cost.
async fn within_a_minute<T, F, Fut>(mut get: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let value = get().await;
        if done(&value) || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn service_account_votes_that_cannot_count_cost_no_access_reviews_and_other_teams_are_approved_meanwhile() {
    let env = Env::builder(TENANT).namespaces(&[OTHER]).node("vrf-node", "64", "256Gi", &[]).all_namespaces().build().await;
    let admin = env.admin.clone();
    let socks: Vec<String> = (0..SOCKS).map(|i| format!("sock-{i}")).collect();
    bind_service_accounts_as_heads(&admin, TENANT, "socks", &socks).await;
    let flooded = create_payments_job(&env.user("dave").await, TENANT, "flooded").await;
    wait_for_job(&admin, TENANT, "flooded", "AwaitingApproval", |j| phase(j) == Some("AwaitingApproval")).await;

    let before = access_reviews(&admin).await;
    for sock in &socks {
        let voter = format!("system:serviceaccount:{TENANT}:{sock}");
        let vote: ApprovalVote = serde_json::from_value(json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "ApprovalVote",
            "metadata": {"name": format!("flooded-{sock}")},
            "spec": {"jobRef": {"name": "flooded", "uid": flooded.metadata.uid.clone().unwrap(), "generation": flooded.metadata.generation.unwrap()},
                     "voter": voter, "decision": "Approve"}}))
        .unwrap();
        Api::<ApprovalVote>::namespaced(impersonating("admin", &voter).await, TENANT)
            .create(&PostParams::default(), &vote)
            .await
            .unwrap_or_else(|e| panic!("{voter} votes: {e}"));
    }

    // Another team's job, voted on while the flood is judged.
    let started = Instant::now();
    let theirs = create_payments_job(&env.user("dave").await, OTHER, "theirs").await;
    wait_for_job(&admin, OTHER, "theirs", "AwaitingApproval", |j| phase(j) == Some("AwaitingApproval")).await;
    vote(&env.alice, &theirs, "alice", Decision::Approve).await;
    vote(&env.bob, &theirs, "bob", Decision::Approve).await;
    let theirs_api: Api<AgentJob> = Api::namespaced(admin.clone(), OTHER);
    let approved = within_a_minute(|| async { theirs_api.get("theirs").await.expect("get job") }, |j| approval(j).approved == 2).await;
    let theirs_took = started.elapsed();

    // Every sock vote judged (not counted) before the reviews are read: the operator has acted.
    let jobs: Api<AgentJob> = Api::namespaced(admin.clone(), TENANT);
    let judged = within_a_minute(|| async { jobs.get("flooded").await.expect("get job") }, |j| ignored_count(j) >= SOCKS).await;
    let reviews = access_reviews(&admin).await - before;
    println!(
        "{SOCKS} ServiceAccount votes: {reviews} SubjectAccessReviews, {} judged; another team's job approved: {} after {theirs_took:?}",
        ignored_count(&judged),
        approval(&approved).approved == 2
    );
    assert_eq!(approval(&approved).approved, 2, "another team's job not approved within a minute of its votes");
    assert_eq!(ignored_count(&judged), SOCKS, "not every sock vote judged within 60s ({reviews} reviews so far)");
    assert_eq!((phase(&judged), approval(&judged).approved), (Some("AwaitingApproval"), 0));
    for ignored in approval(&judged).ignored_votes.iter().filter(|v| v.name != "(more)") {
        assert!(ignored.why.contains("is not a trusted robot voter"), "{}: {}", ignored.name, ignored.why);
    }
    // alice's and bob's head checks on the other team's job and whether each may impersonate
    // dave (4), and slack: none for the socks. Before, these 60 votes cost 8,849.
    assert!(reviews <= 12, "{SOCKS} votes that cannot count cost {reviews} SubjectAccessReviews");

    // Happy path on the flooded job: two human heads still approve it.
    vote(&env.alice, &flooded, "alice", Decision::Approve).await;
    vote(&env.bob, &flooded, "bob", Decision::Approve).await;
    let done = wait_for_job(&admin, TENANT, "flooded", "2/2", |j| approval(j).approved == 2).await;
    let voters: Vec<_> = approval(&done).approvers.iter().map(|a| a.voter.clone()).collect();
    assert_eq!(voters, ["alice", "bob"]);
}
