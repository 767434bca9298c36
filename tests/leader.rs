//! Leader election: of two replicas only one reconciles, and the other takes over within 15 s
//! of the leader's death.

mod support;

use std::time::{Duration, Instant};

use agentgate::api::AgentJob;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use support::cluster::*;
use support::controlplane::{ControlPlane, OperatorProcess};

fn log_of(operator: &OperatorProcess) -> String {
    std::fs::read_to_string(operator.log_path()).unwrap_or_default()
}

async fn submit(client: &kube::Client, ns: &str, name: &str) {
    let job: AgentJob = serde_json::from_value(json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob", "metadata": {"name": name},
        "spec": {"category": "ops", "agents": {"primary": {"name": "agent", "image": "ghcr.io/acme/agent:1", "model": "gpt-4o-mini"}},
                 "budget": {"maxCostUSD": "5"}}}))
    .unwrap();
    Api::<AgentJob>::namespaced(client.clone(), ns).create(&PostParams::default(), &job).await.unwrap();
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over_within_15_seconds() {
    let cp = ControlPlane::shared();
    let ns = "leader";
    cp.namespace(ns).await;
    let admin = cp.client("admin").await;
    let args = ["--namespace", ns, "--metrics-addr", "127.0.0.1:0"];
    let mut first = OperatorProcess::start(cp, &args);
    // Give the first replica the lease before the second one campaigns.
    let start = Instant::now();
    while !log_of(&first).contains("became the leader") {
        assert!(start.elapsed() < Duration::from_secs(20), "first replica never led:\n{}", log_of(&first));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = OperatorProcess::start(cp, &args);

    submit(&admin, ns, "one").await;
    wait_for_job(&admin, ns, "one", "estimated by the leader", |j| phase(j) == Some("AwaitingApproval")).await;
    // The standby has started and campaigned: from here its log would show a takeover or a write.
    while !log_of(&second).contains("standing by for leadership") {
        assert!(start.elapsed() < Duration::from_secs(40), "the second replica never stood by:\n{}", log_of(&second));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!log_of(&second).contains("became the leader"), "two leaders at once:\n{}", log_of(&second));
    assert!(!log_of(&second).contains("phase changed"), "the standby wrote status:\n{}", log_of(&second));

    first.kill();
    let killed = Instant::now();
    submit(&admin, ns, "two").await;
    wait_for_job(&admin, ns, "two", "estimated by the new leader", |j| phase(j) == Some("AwaitingApproval")).await;
    let takeover = killed.elapsed();
    println!("standby took over and reconciled a new job {takeover:?} after the leader was killed");
    assert!(takeover < Duration::from_secs(15), "takeover took {takeover:?}");
    assert!(log_of(&second).contains("became the leader"));
}
