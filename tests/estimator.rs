//! The cost estimator learns from finished runs and keeps what it learned across the deletion
//! of those jobs and an operator restart (state in the ConfigMap `agentgate-estimator`).

mod support;

use std::time::Duration;

use agentgate::api::{AgentJob, Decision};
use agentgate::domain::learning::EstimatorState;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use support::cluster::*;
use support::controlplane::{ControlPlane, OperatorProcess};

const JOB_TYPE: &str = "estimator_learning_scan";

fn job_manifest(name: &str) -> AgentJob {
    let spec = json!({
        "jobType": JOB_TYPE,
        "category": "core-security",
        "agents": {"primary": {"name": "scanner", "image": "ghcr.io/acme/scanner:2.1", "model": "gpt-4o-mini"}},
        "resources": {"cpu": "500m", "memory": "1Gi"},
        "budget": {"maxCostUSD": "5.00"},
    });
    serde_json::from_value(json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob", "metadata": {"name": name}, "spec": spec}))
        .unwrap()
}

async fn estimated(client: &Client, ns: &str, name: &str) -> AgentJob {
    wait_for_job(client, ns, name, "an estimate", |j: &AgentJob| j.status.as_ref().is_some_and(|s| s.estimate.is_some())).await
}

async fn learned_state(client: &Client, ns: &str) -> Option<EstimatorState> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns).get_opt("agentgate-estimator").await.ok()??;
    let text = cm.data?.remove("state.json")?;
    let (state, warning) = EstimatorState::from_json(Some(&text));
    warning.is_none().then_some(state)
}

#[tokio::test]
async fn learned_usage_survives_job_deletion_and_operator_restart() {
    let ns = "est-learn";
    let cp = ControlPlane::shared();
    cp.namespace(ns).await;
    let client = cp.client("admin").await;
    add_node(&client, "estimator-node", "64", "256Gi", &[]).await;
    grant_voting_rights(&client).await;
    let (alice, bob) = (cp.client("alice").await, cp.client("bob").await);
    let args = ["--namespace", ns, "--metrics-addr", "127.0.0.1:0"];
    let mut operator = OperatorProcess::start(cp, &args);
    let jobs: Api<AgentJob> = Api::namespaced(client.clone(), ns);

    // First run: estimated from the prior, then runs with a known, much larger usage.
    let first = jobs.create(&PostParams::default(), &job_manifest("first")).await.expect("create job");
    let prior = estimated(&client, ns, "first").await.status.unwrap().estimate.unwrap();
    assert_eq!((prior.method.as_str(), prior.samples), ("prior", 0));
    vote(&alice, &first, "alice", Decision::Approve).await;
    vote(&bob, &first, "bob", Decision::Approve).await;
    wait_for_job(&client, ns, "first", "Running", |j| phase(j) == Some("Running")).await;
    let pod = "first-scanner-1";
    wait_for("the agent Pod", Duration::from_secs(30), || job_pods(&client, ns, &first), |p: &Vec<_>| p.len() == 1).await;
    run_pod(&client, ns, pod).await;
    let (input, cached, output) = (300_000, 100_000, 50_000);
    finish_pod(&client, ns, pod, 0, &usage_report("gpt-4o-mini", input, cached, output, json!({}))).await;
    wait_for_job(&client, ns, "first", "Succeeded", |j| phase(j) == Some("Succeeded")).await;

    // The leader writes what it learned within a few seconds.
    let state = wait_for(
        "the learned state in the ConfigMap",
        Duration::from_secs(30),
        || learned_state(&client, ns),
        |s: &Option<EstimatorState>| s.as_ref().and_then(|s| s.stats(JOB_TYPE)).is_some_and(|t| t.n == 1),
    )
    .await
    .unwrap();
    assert_eq!(state.seen.len(), 1);
    assert!(state.seen[0].ends_with("/1"), "{:?}", state.seen);

    // The job goes, the operator restarts (SIGKILL: nothing more is written on the way down).
    jobs.delete("first", &DeleteParams::default()).await.expect("delete job");
    let _ = wait_for(
        "the job gone",
        Duration::from_secs(30),
        || jobs.get_opt("first"),
        |j: &Result<Option<AgentJob>, kube::Error>| matches!(j, Ok(None)),
    )
    .await;
    operator.kill();
    let _operator = OperatorProcess::start(cp, &args);

    jobs.create(&PostParams::default(), &job_manifest("second")).await.expect("create job");
    let learned = estimated(&client, ns, "second").await.status.unwrap().estimate.unwrap();
    assert_eq!(learned.method, "blend", "{learned:?}");
    assert_eq!(learned.samples, 1);
    let observed: i64 = input + cached + output;
    assert!(
        learned.tokens.p50 > prior.tokens.p50 && learned.tokens.p50 < observed,
        "prior {} learned {} observed {observed}",
        prior.tokens.p50,
        learned.tokens.p50
    );

    let state: Value = serde_json::from_str(
        &Api::<ConfigMap>::namespaced(client.clone(), ns).get("agentgate-estimator").await.unwrap().data.unwrap()["state.json"],
    )
    .unwrap();
    assert_eq!(state["version"], 1);
    assert_eq!(state["jobTypes"][JOB_TYPE]["n"], 1);
}
