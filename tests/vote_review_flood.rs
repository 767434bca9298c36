//! One tenant's ServiceAccount votes against the operator's SubjectAccessReviews: a head who may
//! create ServiceAccounts and RoleBindings in their namespace binds the head role to many of
//! them and has each vote on a job. None of those votes can count (none is a trusted robot,
//! `--robot-voters`), so none may cost a review: before, each cost a head check, and each other
//! voter was asked whether they may act as it (up to 27 reviews a pair), one after another in the
//! reconcile. Counted by the apiserver itself (`apiserver_request_total`), in its own test binary
//! so that no other test's reviews are counted; another team's job is approved meanwhile. Its
//! tests take turns (`ONE_AT_A_TIME`) for the same reason.

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;

use agentgate::api::{AgentJob, ApprovalVote, Decision};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;
use support::cluster::*;

const TENANT: &str = "vrf-tenant";
const OTHER: &str = "vrf-other";
const SOCKS: usize = 60;

/// Each test counts every SubjectAccessReview the apiserver serves: another test's operator
/// would add its own.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    let _alone = ONE_AT_A_TIME.lock().await;
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

const EIGHT: &str = "vrf-eight";
/// Where the rounds over the slow link run, watched by an operator of its own: the first
/// operator's jobs would cost the second one's reviews again.
const EIGHT_SLOW: &str = "vrf-eight-slow";
/// Voters on [`EIGHT`]'s jobs who are not heads, and the jobs' authors (one a round): users
/// the admin impersonates, who may vote and write jobs in [`EIGHT`] and nothing more.
const NOT_HEADS: [&str; 6] = ["voter-0", "voter-1", "voter-2", "voter-3", "voter-4", "voter-5"];
const AUTHORS: [&str; 6] = ["author-0", "author-1", "author-2", "author-3", "author-4", "author-5"];
/// What the link to the apiserver adds to each request in the slow rounds.
const SLOW_LINK: Duration = Duration::from_millis(10);

fn signal_operator(env: &Env, signal: libc::c_int) {
    let pid = env.operator().pid() as libc::pid_t;
    // SAFETY: kill(2) on this test's own child process; no memory is shared.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal {signal} to the operator ({pid})");
}

/// One round: a job by `author` on its own category; the operator stopped while six voters who
/// are not heads and alice and bob vote, then resumed. Returns how long after it resumed the job
/// was seen approved, and the reviews the apiserver served meanwhile.
async fn eight_votes_at_once(env: &Env, ns: &str, name: &str, author: &str) -> (Duration, u64) {
    let admin = env.admin.clone();
    let job = JobManifest::payments(name).category(name).build();
    let job = Api::<AgentJob>::namespaced(impersonating("admin", author).await, ns)
        .create(&PostParams::default(), &job)
        .await
        .expect("create job");
    wait_for_job(&admin, ns, name, "AwaitingApproval", |j| phase(j) == Some("AwaitingApproval")).await;
    let before = access_reviews(&admin).await;
    signal_operator(env, libc::SIGSTOP);
    for voter in NOT_HEADS {
        vote(&impersonating("admin", voter).await, &job, voter, Decision::Approve).await;
    }
    vote(&env.alice, &job, "alice", Decision::Approve).await;
    vote(&env.bob, &job, "bob", Decision::Approve).await;
    let mut watch = std::pin::pin!(kube::runtime::watcher::watch_object(Api::<AgentJob>::namespaced(admin.clone(), ns), name));
    // The job as it stands (AwaitingApproval) comes first: the watch is open before the operator resumes.
    watch.next().await.expect("watch the job").expect("the job");
    let resumed = Instant::now();
    signal_operator(env, libc::SIGCONT);
    let approved = loop {
        match tokio::time::timeout(Duration::from_secs(60), watch.next()).await {
            Ok(Some(Ok(Some(job)))) if approval(&job).approved == 2 => break job,
            Ok(Some(_)) => continue,
            other => panic!("{name} not approved within a minute of its eight votes: {other:?}"),
        }
    };
    let took = resumed.elapsed();
    let reviews = access_reviews(&admin).await - before;
    let voters: Vec<_> = approval(&approved).approvers.iter().map(|a| a.voter.clone()).collect();
    assert_eq!(voters, ["alice", "bob"], "{name}");
    assert_eq!(ignored_count(&approved), NOT_HEADS.len(), "{name}: {:?}", approval(&approved).ignored_votes);
    (took, reviews)
}

/// A job that eight votes reach at once, none of whose answers the operator has cached (it is
/// stopped while they are cast; each round has its own category and author): the two heads'
/// and six other voters' head checks, then each head's check that they may not impersonate the
/// author, exactly one review each, no more than when votes were judged one after another. How
/// long after the operator resumed the job was approved is printed, directly and over a link
/// adding [`SLOW_LINK`] to each request (README "Performance").
#[tokio::test]
async fn eight_votes_arriving_at_once_cost_one_review_per_question() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut env = Env::builder(EIGHT)
        .namespaces(&[EIGHT_SLOW])
        .node("vrf-eight-node", "64", "256Gi", &[])
        .operator(OperatorMode::Later)
        .build()
        .await;
    // Bound before the operator starts, so this RBAC change drops nothing it will have cached.
    let subjects: Vec<serde_json::Value> =
        NOT_HEADS.iter().chain(&AUTHORS).map(|u| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": u})).collect();
    for ns in [EIGHT, EIGHT_SLOW] {
        let binding: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "eight-voters-and-authors", "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "test-agentgate-voter"}, "subjects": subjects}))
        .unwrap();
        Api::namespaced(env.admin.clone(), ns).create(&PostParams::default(), &binding).await.expect("bind the voters and authors");
    }
    env.start_operator();
    let (direct, slow) = AUTHORS.split_at(AUTHORS.len() / 2);
    let mut figures = Vec::new();
    for (link, ns, authors) in [("direct", EIGHT, direct), ("slow", EIGHT_SLOW, slow)] {
        if link == "slow" {
            let path = support::slow_link::slow_kubeconfig(env.cp, "admin", "vrf-eight-slow", SLOW_LINK);
            let args: Vec<&str> = env.operator_args().into_iter().map(|a| if a == EIGHT { EIGHT_SLOW } else { a }).collect();
            env.operator = Some(support::controlplane::OperatorProcess::start_as(env.cp, &path, &args));
        }
        let mut took = Vec::new();
        for author in authors {
            let name = format!("eight-{author}");
            let (approved_after, reviews) = eight_votes_at_once(&env, ns, &name, author).await;
            println!("{link}: {name}: eight uncached votes approved {approved_after:?} after the operator resumed, {reviews} reviews");
            // Eight head checks and two act-as checks (may alice, may bob impersonate the author).
            assert_eq!(reviews, 10, "{name}: eight votes, all uncached");
            took.push(approved_after);
        }
        took.sort();
        figures.push(format!("{link} {:?} (of {took:?})", took[took.len() / 2]));
    }
    println!("eight uncached votes to approval, median: {} ({SLOW_LINK:?} added to each request)", figures.join("; "));
}
