//! `kubectl agentgate estimate | infra | stats` against the real apiserver, with objects the
//! operator produced: the plugin reads the cluster's price table and learned state, the tools,
//! node capacity and quotas, and the jobs' usage.

mod support;

use std::path::Path;
use std::time::Duration;

use agentgate::api::{AgentJob, AgentTool, Decision};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ResourceQuota};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::cluster::*;

const NS: &str = "plugin-reports";
const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-agentgate");

fn manifest(name: &str) -> Value {
    json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob", "metadata": {"name": name, "namespace": NS},
        "spec": {"jobType": "report_scan", "category": "core-security",
                 "agents": {"primary": {"name": "scanner", "image": "ghcr.io/acme/scanner:2.1", "model": "local-llm"}},
                 "tools": [{"name": "pr-search", "required": false, "estimatedCalls": 5}],
                 "resources": {"cpu": "500m", "memory": "1Gi"}, "budget": {"maxCostUSD": "1.00"}}
    })
}

async fn plugin_json(kubeconfig: &Path, args: &[&str]) -> Value {
    let out = tokio::process::Command::new(PLUGIN)
        .args(args)
        .args(["-o", "json", "-n", NS])
        .env("KUBECONFIG", kubeconfig)
        .output()
        .await
        .expect("running kubectl-agentgate");
    assert!(out.status.success(), "kubectl agentgate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

async fn plugin_table(kubeconfig: &Path, args: &[&str]) -> String {
    let out = tokio::process::Command::new(PLUGIN).args(args).args(["-n", NS]).env("KUBECONFIG", kubeconfig).output().await.unwrap();
    assert!(out.status.success(), "kubectl agentgate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

async fn apply<K: kube::Resource<DynamicType = ()> + serde::de::DeserializeOwned + Clone + std::fmt::Debug>(
    api: &Api<K>,
    name: &str,
    obj: Value,
) {
    api.patch(name, &PatchParams::apply("test").force(), &Patch::Apply(obj)).await.unwrap_or_else(|e| panic!("apply {name}: {e}"));
}

#[tokio::test]
async fn estimate_infra_and_stats_report_what_the_cluster_holds() {
    let env =
        Env::builder(NS).node("pr-node", "8", "32Gi", &[("nvidia.com/gpu", "2")]).args(&["--price-config-map", "prices"]).build().await;
    let (cp, admin) = (env.cp, env.admin.clone());
    let kubeconfig = cp.kubeconfig("admin");
    let config_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), NS);
    apply(
        &config_maps,
        "prices",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "prices"}, "data": {
        "prices.yaml": "models:\n  local-llm: {inputPerMillion: 1, cachedInputPerMillion: 0.5, outputPerMillion: 2}\n"}}),
    )
    .await;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_saphyr::to_string(&manifest("planned")).unwrap()).unwrap();
    let estimate_args = ["estimate", "-f", file.path().to_str().unwrap(), "--operator-namespace", NS, "--price-config-map", "prices"];

    // Before any run: the prior, priced from the cluster's ConfigMap (the built-in table has no
    // local-llm, so a price here proves the ConfigMap was read). 7,500 + 5 x 2,400 = 19,500 tokens.
    let prior = plugin_json(&kubeconfig, &estimate_args).await;
    assert_eq!(prior["method"], "prior");
    assert_eq!(prior["tokensP50"], 19_500);
    assert_eq!(prior["models"][0]["priorTokens"], 19_500);
    assert_eq!(prior["overBudget"], Value::Null);
    assert!(plugin_table(&kubeconfig, &estimate_args).await.contains("from the spec alone"));

    // One run with known usage, approved by two heads.
    let jobs: Api<AgentJob> = Api::namespaced(admin.clone(), NS);
    let job = jobs.create(&PostParams::default(), &serde_json::from_value(manifest("ran")).unwrap()).await.unwrap();
    vote(&cp.client("alice").await, &job, "alice", Decision::Approve).await;
    vote(&cp.client("bob").await, &job, "bob", Decision::Approve).await;
    wait_for("the agent Pod", Duration::from_secs(30), || job_pods(&admin, NS, &job), |p: &Vec<_>| p.len() == 1).await;
    run_pod(&admin, NS, "ran-scanner-1-agentgate").await;
    finish_pod(&admin, NS, "ran-scanner-1-agentgate", 0, &usage_report("local-llm", 150_000, 20_000, 25_000, json!({}))).await;
    wait_for_job(&admin, NS, "ran", "Succeeded", |j| phase(j) == Some("Succeeded")).await;
    let learned = wait_for(
        "the learned state to reach the estimate",
        Duration::from_secs(30),
        || plugin_json(&kubeconfig, &estimate_args),
        |e: &Value| e["samples"] == 1,
    )
    .await;
    assert_eq!(learned["method"], "blend");
    // 195,000 used against a prior of 19,500: ten times.
    assert_eq!(learned["models"][0]["learnedRatio"], 10.0);
    assert!(learned["tokensP50"].as_i64().unwrap() > prior["tokensP50"].as_i64().unwrap() * 4);

    // Stats: the finished job's usage by category and model, exactly as reported.
    let stats = plugin_json(&kubeconfig, &["stats", "--since", "1h"]).await;
    assert_eq!(stats["jobsByPhase"]["Succeeded"], 1);
    assert_eq!(
        stats["usage"],
        json!([{"category": "core-security", "model": "local-llm", "jobs": 1, "tokens": 195_000, "costUSD": "0.21"}]),
        "150,000 x $1 + 20,000 x $0.5 + 25,000 x $2 per million"
    );
    assert_eq!(stats["estimateAccuracy"]["jobs"], 1);
    assert_eq!(stats["approvalLatency"]["jobs"], 1);
    assert!(stats["approvalLatency"]["p50Seconds"].as_i64().unwrap() < 60);

    // Infra: a tool, the node's capacity left after a bound Pod, a quota.
    let tool: AgentTool = serde_json::from_value(json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentTool",
        "metadata": {"name": "pr-search"},
        "spec": {"type": "service", "endpoint": {"service": {"namespace": NS, "name": "search", "port": 8080}}, "rateLimit": 30}}))
    .unwrap();
    Api::<AgentTool>::all(admin.clone()).create(&PostParams::default(), &tool).await.unwrap();
    let bound: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bound", "namespace": NS},
        "spec": {"nodeName": "pr-node", "containers": [{"name": "c", "image": "busybox",
                 "resources": {"requests": {"cpu": "1500m", "memory": "2Gi", "nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}}]}}))
    .unwrap();
    Api::<Pod>::namespaced(admin.clone(), NS).create(&PostParams::default(), &bound).await.unwrap();
    let quota: ResourceQuota = serde_json::from_value(json!({"apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": "team"}, "spec": {"hard": {"requests.cpu": "4", "pods": "10"}}}))
    .unwrap();
    Api::<ResourceQuota>::namespaced(admin.clone(), NS).create(&PostParams::default(), &quota).await.unwrap();
    let infra = wait_for(
        "the tool's status",
        Duration::from_secs(30),
        || plugin_json(&kubeconfig, &["infra"]),
        |i: &Value| i["tools"].as_array().is_some_and(|t| t.iter().any(|t| t["name"] == "pr-search")),
    )
    .await;
    let tool = infra["tools"].as_array().unwrap().iter().find(|t| t["name"] == "pr-search").unwrap();
    assert_eq!((tool["rateLimit"].clone(), tool["ready"].clone()), (json!(30), json!(false)), "no Service, no endpoint: {tool}");
    let node = infra["nodes"].as_array().unwrap().iter().find(|n| n["name"] == "pr-node").unwrap();
    assert_eq!(node["cpuFreeMilli"], 6_500, "{node}");
    assert_eq!(node["memoryFreeBytes"], 30i64 << 30);
    assert_eq!(node["extendedFree"]["nvidia.com/gpu"], 1);
    let quotas = infra["quotas"].as_array().unwrap();
    assert!(quotas.iter().any(|q| q["name"] == "team" && q["resource"] == "requests.cpu" && q["hard"] == "4"), "{quotas:?}");
    let table = plugin_table(&kubeconfig, &["infra"]).await;
    assert!(table.contains("pr-search") && table.contains("0/30") && table.contains("6500m"), "{table}");
}
