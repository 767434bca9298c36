//! Cost advice on the real control plane: jobs run to the end through the operator (votes, Pods,
//! usage reports), the job that finishes last gets `status.recommendations` from its namespace's
//! history, and `kubectl agentgate recommend` prints the same advice. A second tenant running
//! the same jobType elsewhere neither contributes to nor receives the first one's advice.

mod support;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use agentgate::api::{AgentJob, Decision, RecommendationKind};
use futures::future::join_all;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;
use support::cluster::*;
use support::controlplane::ControlPlane;

const TENANT: &str = "rec-a";
const OTHER: &str = "rec-b";

/// Runs one job of jobType `scan` with `model` to Succeeded: created by admin, approved by alice
/// and bob, its Pod run and finished with a report of `input`/`output` tokens of `model`.
async fn run_job(admin: &Client, ns: &str, name: &str, model: &str, input: i64, output: i64) {
    let job = agent_job(
        name,
        json!({"jobType": "scan", "category": "payments", "budget": {"maxCostUSD": "5"},
               "agents": {"primary": {"name": "agent", "image": "ghcr.io/acme/agent:1", "model": model}},
               "resources": {"cpu": "100m", "memory": "128Mi"}}),
        json!({}),
    );
    let job = Api::<AgentJob>::namespaced(admin.clone(), ns).create(&PostParams::default(), &job).await.expect("create job");
    let cp = ControlPlane::shared();
    wait_for_job(admin, ns, name, "AwaitingApproval", |j| phase(j) == Some("AwaitingApproval")).await;
    vote(&cp.client("alice").await, &job, "alice", Decision::Approve).await;
    vote(&cp.client("bob").await, &job, "bob", Decision::Approve).await;
    wait_for_job(admin, ns, name, "Running", |j| phase(j) == Some("Running")).await;
    let pod = format!("{name}-agent-1-agentgate");
    wait_for(&format!("pod {pod}"), Duration::from_secs(30), || async { job_pods(admin, ns, &job).await.len() }, |n: &usize| *n == 1).await;
    run_pod(admin, ns, &pod).await;
    finish_pod(admin, ns, &pod, 0, &usage_report(model, input, 0, output, json!({"ok": true}))).await;
    // Learned means the operator's cache holds the Succeeded status (it marks what it read there),
    // so a job finishing after this one counts it.
    wait_for_job(admin, ns, name, "Succeeded and learned", |j| {
        phase(j) == Some("Succeeded") && j.status.as_ref().is_some_and(|s| s.attempts.iter().all(|a| a.learned == Some(true)))
    })
    .await;
}

async fn plugin(kubeconfig: &Path, args: &[&str]) -> Output {
    support::plugin::run(kubeconfig, args).await
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "status {}\nstderr: {}", output.status, String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn finished_jobs_get_advice_from_their_own_namespace_only() {
    // Both namespaces watched by one operator, as in a shared cluster.
    let env = Env::builder(TENANT).namespaces(&[OTHER]).node("rec-node", "64", "256Gi", &[]).all_namespaces().build().await;
    let (cp, admin) = (env.cp, env.admin.clone());

    // Tenant A: five runs on gpt-4o ($0.35 each), five on gpt-4o-mini ($0.021 each), all succeeded.
    // The other tenant floods the same jobType with near-free gpt-4o-mini runs.
    let mut plan: Vec<(&str, String, &str, i64, i64)> = Vec::new();
    for i in 0..5 {
        plan.push((TENANT, format!("big-{i}"), "gpt-4o", 100_000, 10_000));
        plan.push((TENANT, format!("small-{i}"), "gpt-4o-mini", 100_000, 10_000));
        plan.push((OTHER, format!("flood-{i}"), "gpt-4o-mini", 10, 1));
    }
    plan.push((OTHER, "flood-5".into(), "gpt-4o-mini", 10, 1));
    let runs = plan.iter().map(|(ns, name, model, input, output)| run_job(&admin, ns, name, model, *input, *output));
    join_all(runs).await;
    let ten = Api::<AgentJob>::namespaced(admin.clone(), TENANT).get("small-4").await.unwrap();
    let status = ten.status.unwrap();
    assert!(
        !status.recommendations.iter().any(|r| r.kind == RecommendationKind::CheaperModel),
        "advice is about the job's own model, and nothing is cheaper than gpt-4o-mini here: {:#?}",
        status.recommendations
    );

    // The last gpt-4o run finishes: its status carries the advice, from tenant A's runs alone.
    run_job(&admin, TENANT, "big-last", "gpt-4o", 100_000, 10_000).await;
    let last = Api::<AgentJob>::namespaced(admin.clone(), TENANT).get("big-last").await.unwrap();
    let advice = last.status.clone().unwrap().recommendations;
    eprintln!("status.recommendations of big-last: {advice:#?}");
    let cheaper = advice.iter().find(|r| r.kind == RecommendationKind::CheaperModel).expect("a cheaper model is recommended");
    assert_eq!((cheaper.saving_per_run_usd.as_str(), cheaper.samples), ("0.329", 11), "mean $0.35 - $0.021 over 6 + 5 runs");
    assert_eq!(cheaper.saving_over_samples_usd, "1.974", "6 gpt-4o runs × $0.329");
    assert!(cheaper.evidence.contains("gpt-4o-mini: 5 runs, 100% succeeded, 100% valid output, mean $0.021"), "{}", cheaper.evidence);
    let kinds: Vec<_> = advice.iter().map(|r| r.kind).collect();
    assert!(kinds.contains(&RecommendationKind::PromptCache) && kinds.contains(&RecommendationKind::BudgetTooHigh), "{kinds:?}");

    // The other tenant's last run (gpt-4o, its only one) gets nothing from tenant A's history.
    run_job(&admin, OTHER, "lone-big", "gpt-4o", 100_000, 10_000).await;
    let lone = Api::<AgentJob>::namespaced(admin.clone(), OTHER).get("lone-big").await.unwrap();
    let theirs = lone.status.unwrap().recommendations;
    assert!(
        theirs.iter().all(|r| r.kind != RecommendationKind::CheaperModel && !r.evidence.contains("gpt-4o-mini: 5 runs") && r.samples <= 7),
        "{theirs:#?}"
    );

    // The plugin: the same advice as a table, with evidence and savings, for alice's namespace.
    let alice = cp.kubeconfig("alice");
    let table = stdout(&plugin(&alice, &["recommend", "-n", TENANT]).await);
    eprintln!("kubectl agentgate recommend -n {TENANT}:\n{table}");
    assert!(table.contains("jobType scan in rec-a: 11 finished job(s), advice on the configuration of big-last"), "{table}");
    let row = table.lines().find(|l| l.contains("CheaperModel")).expect("a CheaperModel row");
    assert!(row.contains("$0.329") && row.contains("$1.974") && row.contains("use gpt-4o-mini instead of gpt-4o"), "{row}");
    assert!(table.contains("evidence: runs whose primary agent used gpt-4o: 6 runs"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&stdout(&plugin(&alice, &["recommend", "-n", TENANT, "-o", "json"]).await)).unwrap();
    assert_eq!(json["minSamples"], 5);
    assert_eq!(json["jobTypes"][0]["recommendations"][0]["kind"], "CheaperModel", "largest saving first: {json:#}");
    let other = stdout(&plugin(&alice, &["recommend", "-n", OTHER, "--job-type", "scan"]).await);
    assert!(!other.contains("CheaperModel") && other.contains("jobType scan in rec-b: 7 finished job(s)"), "{other}");
    let none = stdout(&plugin(&alice, &["recommend", "-n", TENANT, "--job-type", "nope"]).await);
    assert_eq!(none, "no finished AgentJobs with usage in rec-a\n");
    drop(env);
}
