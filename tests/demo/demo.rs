//! `make demo`: a local control plane, the operator, the example jobs in deploy/examples, two
//! category heads voting and a simulated kubelet, ending with estimated against actual cost.
//!
//! Everything it starts dies with it (Ctrl-C included).

#[path = "../support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use agentgate::api::{AgentJob, Decision, JobPhase};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use support::cluster::{add_node, finish_pod, grant_voting_rights, run_pod, vote};
use support::controlplane::{ControlPlane, OperatorProcess};

const JOBS: [(&str, &str); 3] =
    [("team-security", "security-scan-42"), ("team-marketing", "content-generation-7"), ("team-catalog", "product-import-3")];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let root = env!("CARGO_MANIFEST_DIR");
    step("Starting etcd and kube-apiserver (v1.37.2, built from the Go modules) on loopback");
    let cp = ControlPlane::shared();
    let admin = cp.client("admin").await;
    println!("  apiserver {}  (kubeconfig: {})", cp.server(), cp.kubeconfig("admin").display());

    step("Registering two worker nodes (no GPUs) and the in-cluster tool backends");
    add_node(&admin, "worker-1", "8", "32Gi", &[]).await;
    add_node(&admin, "worker-2", "4", "16Gi", &[]).await;
    kubectl(cp, &["apply", "-f", &format!("{root}/deploy/examples/00-namespaces.yaml")]);
    for ns in ["tools", "team-security", "team-marketing", "team-catalog"] {
        cp.namespace(ns).await;
    }
    apply_tool_backends(&admin).await?;
    // alice and bob (group agentgate:heads) become heads of every category; everyone may vote.
    grant_voting_rights(&admin).await;

    step("Starting the operator");
    let operator = OperatorProcess::start(cp, &["--metrics-addr", "127.0.0.1:0"]);
    println!("  log: {}", operator.log_path().display());

    step("kubectl apply -f deploy/examples/");
    kubectl(cp, &["apply", "-f", &format!("{root}/deploy/examples/")]);
    tokio::spawn(play_kubelet(admin.clone()));

    wait_until(&admin, "every job to be estimated and waiting for approval", |j| {
        j.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::AwaitingApproval)
            && j.status.as_ref().is_some_and(|s| s.checks.iter().all(|c| c.passed))
    })
    .await?;
    kubectl(cp, &["get", "agentjobs", "-A", "-o", "wide"]);

    step("alice and bob, category heads, approve every job with their own credentials");
    let alice = cp.client("alice").await;
    let bob = cp.client("bob").await;
    for (ns, name) in JOBS {
        let job = Api::<AgentJob>::namespaced(admin.clone(), ns).get(name).await?;
        vote(&alice, &job, "alice", Decision::Approve).await;
        vote(&bob, &job, "bob", Decision::Approve).await;
    }

    step("The operator creates the agent Pods; the demo plays the kubelet and the agents report usage");
    wait_until(&admin, "every job to finish", |j| j.status.as_ref().and_then(|s| s.phase).is_some_and(JobPhase::is_terminal)).await?;

    step("kubectl get agentjobs,agenttools,approvalvotes -A");
    kubectl(cp, &["get", "agentjobs,agenttools,approvalvotes", "-A"]);
    step("Estimated against actual cost");
    print_cost_table(&admin).await?;
    step("Why each job ended (its Ready condition)");
    kubectl(
        cp,
        &[
            "get",
            "agentjobs",
            "-A",
            "-o",
            "custom-columns=NAMESPACE:.metadata.namespace,JOB:.metadata.name,REASON:.status.conditions[?(@.type==\"Ready\")].reason,MESSAGE:.status.conditions[?(@.type==\"Ready\")].message",
        ],
    );
    kubectl(cp, &["get", "pods", "-A", "-l", "app.kubernetes.io/managed-by=agentgate"]);
    println!("\nDone. Everything started by the demo stops now.");
    drop(operator);
    Ok(())
}

fn step(what: &str) {
    println!("\n==> {what}");
}

fn kubectl(cp: &ControlPlane, args: &[&str]) {
    let out = cp.kubectl("admin", args);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// The bandit Service with one ready endpoint (what the endpoint controller would publish) and
/// the catalog API key.
async fn apply_tool_backends(admin: &Client) -> anyhow::Result<()> {
    let pp = PatchParams::apply("agentgate-demo");
    let objects = [
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bandit", "namespace": "tools"},
               "spec": {"ports": [{"name": "http", "port": 8080}], "selector": {"app": "bandit"}}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "bandit-1", "namespace": "tools", "labels": {"kubernetes.io/service-name": "bandit"}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
               "endpoints": [{"addresses": ["10.0.0.12"], "conditions": {"ready": true}}]}),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "catalog-api-key", "namespace": "tools"},
               "stringData": {"token": "demo-token-not-a-real-secret"}}),
    ];
    for obj in objects {
        let dynamic: kube::api::DynamicObject = serde_json::from_value(obj.clone())?;
        let gvk = kube::api::GroupVersionKind::try_from(dynamic.types.as_ref().unwrap())?;
        let (resource, _) = kube::discovery::pinned_kind(admin, &gvk).await?;
        let api: Api<kube::api::DynamicObject> = match dynamic.namespace() {
            Some(ns) => Api::namespaced_with(admin.clone(), &ns, &resource),
            None => Api::all_with(admin.clone(), &resource),
        };
        api.patch(&dynamic.name_any(), &pp, &Patch::Apply(&obj)).await?;
    }
    Ok(())
}

/// Watches agent Pods and plays the kubelet: Running, then exit with a usage report. The first
/// attempt of the product import fails (the supplier feed times out) to show a retry.
async fn play_kubelet(client: Client) {
    let pods: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().labels("app.kubernetes.io/managed-by=agentgate");
    let mut seen = BTreeSet::new();
    let mut stream = watcher(pods, config).applied_objects().boxed();
    while let Some(Ok(pod)) = stream.next().await {
        let key = (pod.namespace().unwrap_or_default(), pod.name_any());
        if pod.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|p| p != "Pending") || !seen.insert(key.clone()) {
            continue;
        }
        let client = client.clone();
        tokio::spawn(async move {
            let (ns, name) = key;
            let env = |var: &str| {
                pod.spec
                    .as_ref()
                    .and_then(|s| s.containers[0].env.as_ref())
                    .and_then(|e| e.iter().find(|v| v.name == var))
                    .and_then(|v| v.value.clone())
                    .unwrap_or_default()
            };
            let (model, attempt) = (env("AGENTGATE_MODEL"), env("AGENTGATE_ATTEMPT"));
            tokio::time::sleep(Duration::from_millis(400)).await;
            run_pod(&client, &ns, &name).await;
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let seed = name.bytes().fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
            let input = 9_000 + (seed % 40_000) as i64;
            let cached = if model.starts_with("claude") || model.starts_with("gpt") { input / 4 } else { 0 };
            let output = input / 5;
            let output_doc = if name.starts_with("security-scan") { json!({"findings": 3, "fixed": 2}) } else { json!({"status": "done"}) };
            let report = json!({"usage": [{"model": model, "inputTokens": input, "cachedInputTokens": cached, "outputTokens": output}], "output": output_doc}).to_string();
            let fails = name.starts_with("product-import") && attempt == "1";
            finish_pod(&client, &ns, &name, i32::from(fails), &report).await;
        });
    }
}

async fn wait_until(client: &Client, what: &str, done: impl Fn(&AgentJob) -> bool) -> anyhow::Result<()> {
    println!("  waiting for {what} ...");
    for _ in 0..600 {
        let mut all = true;
        for (ns, name) in JOBS {
            match Api::<AgentJob>::namespaced(client.clone(), ns).get_opt(name).await? {
                Some(job) if done(&job) => {}
                _ => all = false,
            }
        }
        if all {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("timed out waiting for {what}")
}

async fn print_cost_table(client: &Client) -> anyhow::Result<()> {
    println!(
        "{:<16} {:<22} {:<10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>8}",
        "NAMESPACE", "JOB", "PHASE", "EST P50", "EST P90", "ACTUAL", "TOKENS", "ATTEMPTS", "ERROR"
    );
    for (ns, name) in JOBS {
        let job = Api::<AgentJob>::namespaced(client.clone(), ns).get(name).await?;
        let s = job.status.unwrap_or_default();
        let est = s.estimate.unwrap_or_default();
        let usage = s.usage.unwrap_or_default();
        println!(
            "{:<16} {:<22} {:<10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>8}",
            ns,
            name,
            s.phase.map(|p| p.as_str()).unwrap_or("-"),
            format!("${}", est.cost_usd.p50),
            format!("${}", est.cost_usd.p90),
            format!("${}", usage.cost_usd),
            usage.total_tokens,
            s.attempts.len(),
            usage.estimate_error_percent.map(|e| format!("{e:+}%")).unwrap_or_default(),
        );
    }
    Ok(())
}
