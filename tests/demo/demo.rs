//! `make demo`: a local control plane, the operator, the example jobs in deploy/examples, two
//! category heads voting, ending with estimated against actual cost.
//!
//! On a real node when this machine can run one (root and runc; tests/support/node.rs): the chart
//! installs the operator as Pods (image made from the cargo build) and the agents run as real Pods
//! of the reference agent image, each making one model call through its meter: the provider is
//! the stand-in (tests/meter/upstream.py) on the node IP, which each team's keys Secret names,
//! and the meters draw their budgets from the operator's meter API by its Service name.
//! Otherwise, saying so, on the simulated kubelet: two registered nodes and the demo writing the
//! agent Pods' status. `AGENTGATE_DEMO_SIMULATED=1` asks for it.
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
use support::node::{NODE_IP, NODE_NAME, NodeOptions, OPERATOR_DEBUG_REPOSITORY, OPERATOR_DEBUG_TAG, REFERENCE_AGENT_IMAGE, RealNode};
use support::provider::StandInProvider;

const JOBS: [(&str, &str); 3] =
    [("team-security", "security-scan-42"), ("team-marketing", "content-generation-7"), ("team-catalog", "product-import-3")];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // On Ctrl-C the node is torn down too (its containers would outlive a killed process). While
    // it starts, that happens once the start returns: the runtime waits for it on the way out,
    // and drops the node it made.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let interrupted = || println!("\nInterrupted: stopping everything the demo started.");
    let node = tokio::select! {
        node = real_node() => node,
        _ = interrupt.recv() => {
            interrupted();
            return Ok(());
        }
    };
    let result = tokio::select! {
        result = demo(node.as_ref()) => result,
        _ = interrupt.recv() => {
            interrupted();
            Ok(())
        }
    };
    drop(node);
    result
}

async fn demo(node: Option<&RealNode>) -> anyhow::Result<()> {
    let root = env!("CARGO_MANIFEST_DIR");
    let cp = match node {
        Some(node) => node.control_plane(),
        None => {
            step("Starting etcd and kube-apiserver (v1.37.2, built from the Go modules) on loopback");
            ControlPlane::shared()
        }
    };
    let admin = cp.client("admin").await;
    println!("  apiserver {}  (kubeconfig: {})", cp.server(), cp.kubeconfig("admin").display());

    if node.is_some() {
        step("The in-cluster tool backends");
    } else {
        step("Registering two worker nodes (no GPUs) and the in-cluster tool backends");
        add_node(&admin, "worker-1", "8", "32Gi", &[]).await;
        add_node(&admin, "worker-2", "4", "16Gi", &[]).await;
    }
    kubectl(cp, &["apply", "-f", &format!("{root}/deploy/examples/00-namespaces.yaml")]);
    for ns in ["tools", "team-security", "team-marketing", "team-catalog"] {
        cp.namespace(ns).await;
    }
    apply_tool_backends(&admin).await?;
    // alice and bob (group agentgate:heads) become heads of every category; everyone may vote.
    grant_voting_rights(&admin).await;

    let mut provider = None;
    let operator = match node {
        Some(node) => {
            install_operator(node).await?;
            provider = Some(start_provider(cp, &admin).await?);
            step("kubectl apply -f deploy/examples/");
            println!(
                "  (on this node every agent runs the reference agent image {REFERENCE_AGENT_IMAGE} with 250m CPU and 128Mi,\n   \
                 making one Chat Completions call through its meter: the ghcr.io/acme images are not on this machine.\n   \
                 A one-line script stands in for the scanner's findings and for the supplier feed that times out on the\n   \
                 product import's first attempt.)"
            );
            let examples = examples_for_the_real_node(cp)?;
            kubectl(cp, &["apply", "-f", &examples.display().to_string()]);
            None
        }
        None => {
            step("Starting the operator");
            let operator = OperatorProcess::start(cp, &["--metrics-addr", "127.0.0.1:0"]);
            println!("  log: {}", operator.log_path().display());
            step("kubectl apply -f deploy/examples/");
            kubectl(cp, &["apply", "-f", &format!("{root}/deploy/examples/")]);
            tokio::spawn(play_kubelet(admin.clone()));
            Some(operator)
        }
    };

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

    match node {
        Some(_) => step("The operator creates the agent Pods; the kubelet runs them, each agent calls its model through its meter"),
        None => step("The operator creates the agent Pods; the demo plays the kubelet and the agents report usage"),
    }
    wait_until(&admin, "every job to finish", |j| j.status.as_ref().and_then(|s| s.phase).is_some_and(JobPhase::is_terminal)).await?;

    step("kubectl get agentjobs,agenttools,approvalvotes -A");
    kubectl(cp, &["get", "agentjobs,agenttools,approvalvotes", "-A"]);
    step("Estimated against actual cost");
    if node.is_some() {
        println!(
            "  (each agent made one small call, far below an estimate made for the real agents; ACTUAL and TOKENS are\n   \
             what the meters measured at the wire, SPENT their running total (kubectl's Spent column), METERS the\n   \
             meters that drew on the job's budget)"
        );
    }
    print_cost_table(&admin).await?;
    if let Some(provider) = &provider {
        print_provider_calls(provider, &admin).await?;
    }
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
    let pods = ["get", "pods", "-A", "-l", "app.kubernetes.io/managed-by=agentgate", "-o", "wide"];
    // Wide shows the node and Pod IP a real kubelet gave each Pod; the simulated one gives none.
    kubectl(cp, if node.is_some() { &pods } else { &pods[..5] });
    println!("\nDone. Everything started by the demo stops now.");
    drop(operator);
    drop(provider);
    Ok(())
}

/// The real node, when this machine can run one; otherwise one line saying why the demo plays
/// the kubelet instead.
async fn real_node() -> Option<RealNode> {
    let simulated = |why: &str| {
        println!("\n==> Kubelet: SIMULATED ({why}); the demo writes the agent Pods' status itself");
        None
    };
    if std::env::var_os("AGENTGATE_DEMO_SIMULATED").is_some_and(|v| !v.is_empty() && v != "0") {
        return simulated("AGENTGATE_DEMO_SIMULATED is set");
    }
    if let Some(why) = support::node::unavailable() {
        return simulated(&format!("no real node here: {why}"));
    }
    println!(
        "\n==> Kubelet: REAL: a node on this machine (containerd 2 + runc + CNI bridge, kubelet and kube-scheduler v1.37.2), \
         the operator in-cluster"
    );
    step("Starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd and the kubelet");
    match tokio::task::spawn_blocking(|| RealNode::start_with(NodeOptions { in_cluster: true })).await {
        Ok(Ok(node)) => {
            println!("  node {NODE_NAME} Ready; its logs: {}", support::node::LOG_DIR);
            Some(node)
        }
        Ok(Err(e)) => simulated(&format!("the real node failed to start: {e:#}")),
        Err(e) => simulated(&format!("the real node failed to start: {e}")),
    }
}

/// `helm install` of the chart into agentgate-system (restricted Pod Security, as
/// deploy/namespace.yaml sets it), with the operator image made from the cargo build.
async fn install_operator(node: &RealNode) -> anyhow::Result<()> {
    let root = env!("CARGO_MANIFEST_DIR");
    let cp = node.control_plane();
    step("Making the operator image from the cargo build (deploy/images/debug-image.sh) and loading it into containerd");
    let image = tokio::task::block_in_place(|| node.import_operator_debug_image())?;
    println!("  {image}");
    step("helm install agentgate charts/agentgate -n agentgate-system (2 replicas, leader election)");
    kubectl(cp, &["apply", "--server-side", "-f", &format!("{root}/deploy/namespace.yaml")]);
    let helm = support::tools::helm();
    // Async, so that Ctrl-C during the install stops it and tears the node down.
    let out = tokio::process::Command::new(&helm)
        .kill_on_drop(true)
        .current_dir(root)
        .args(["install", "agentgate", "charts/agentgate", "--namespace", "agentgate-system", "--take-ownership", "--force-conflicts"])
        .args(["--set", &format!("image.repository={OPERATOR_DEBUG_REPOSITORY}"), "--set", &format!("image.tag={OPERATOR_DEBUG_TAG}")])
        .args(["--set", "image.pullPolicy=Never", "--wait", "--timeout", "3m", "--kubeconfig"])
        .arg(cp.kubeconfig("admin"))
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "helm install failed: {}", String::from_utf8_lossy(&out.stderr));
    kubectl(cp, &["get", "pods", "-n", "agentgate-system", "-o", "wide"]);
    println!("  operator logs: kubectl logs -n agentgate-system deploy/agentgate --kubeconfig {}", cp.kubeconfig("admin").display());
    Ok(())
}

/// The stand-in provider on the node IP, and in each team's namespace the keys Secret that points
/// its meters at it (README "The agent meter": the upstream annotation, the key only the meters
/// mount).
async fn start_provider(cp: &ControlPlane, admin: &Client) -> anyhow::Result<StandInProvider> {
    step("The model provider: the stand-in (tests/meter/upstream.py) on the node IP, no real provider is reachable here");
    let provider = StandInProvider::start(NODE_IP, cp.dir())?;
    println!("  {} ; keys Secret agentgate-llm-keys in each team namespace names it", provider.openai_upstream());
    let pp = PatchParams::apply("agentgate-demo");
    for (ns, _) in JOBS {
        let secret = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "agentgate-llm-keys", "namespace": ns,
                         "annotations": {"agentgate.dev/openai-upstream": provider.openai_upstream()}},
            "stringData": {"openai": format!("sk-demo-{ns}-not-a-real-key")}});
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), ns)
            .patch("agentgate-llm-keys", &pp, &Patch::Apply(&secret))
            .await?;
    }
    Ok(provider)
}

/// What the provider answered, summed, beside what the jobs recorded: the meters' measurement.
async fn print_provider_calls(provider: &StandInProvider, admin: &Client) -> anyhow::Result<()> {
    let calls = provider.calls()?;
    let sum = |key: &str| calls.iter().filter_map(|c| c["usage"][key].as_i64()).sum::<i64>();
    let mut recorded = (0, 0, 0);
    for (ns, name) in JOBS {
        let usage = Api::<AgentJob>::namespaced(admin.clone(), ns).get(name).await?.status.unwrap_or_default().usage.unwrap_or_default();
        recorded = (recorded.0 + usage.input_tokens, recorded.1 + usage.cached_input_tokens, recorded.2 + usage.output_tokens);
    }
    println!(
        "  the provider answered {} calls: input {} + cached {} + output {} tokens; the jobs' status.usage: input {} + cached {} + output {}",
        calls.len(),
        sum("input"),
        sum("cached"),
        sum("output"),
        recorded.0,
        recorded.1,
        recorded.2
    );
    Ok(())
}

/// deploy/examples/ as a v1 List, its AgentJobs' agents running the reference agent image with
/// resources this node has and a `chat` prompt in their input; written next to the kubeconfigs.
fn examples_for_the_real_node(cp: &ControlPlane) -> anyhow::Result<std::path::PathBuf> {
    // The security scan's outputSchema wants `findings`; the importer's feed fails its first attempt
    // after the agent wrote its report (so that attempt's usage counts, as with a real agent).
    const SCANNER: &str =
        r#"report=$(/agent) && printf '%s' "$report" | sed 's/"output":{/"output":{"findings":0,/' > /dev/termination-log"#;
    const IMPORTER: &str = r#"/agent && if [ "$AGENTGATE_ATTEMPT" = 1 ]; then echo 'supplier feed timed out' >&2; exit 1; fi"#;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    files.sort();
    let mut items = Vec::new();
    for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "yaml")) {
        for mut doc in serde_saphyr::from_multiple::<serde_json::Value>(&std::fs::read_to_string(file)?)? {
            if doc["kind"] == "AgentJob" {
                let name = doc["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                let spec = &mut doc["spec"];
                spec["resources"]["cpu"] = json!("250m");
                spec["resources"]["memory"] = json!("128Mi");
                // The reference agent's one model call (plain characters: no quotes or commas).
                let prompt: String = spec["description"]
                    .as_str()
                    .unwrap_or("say hello")
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == ' ')
                    .collect();
                spec["input"]["chat"] = json!(prompt);
                let script = [("security-scan", SCANNER), ("product-import", IMPORTER)].into_iter().find(|(p, _)| name.starts_with(p));
                let agents = spec["agents"].as_object_mut().into_iter().flat_map(|a| a.values_mut());
                // `primary` is one agent, `supporting` a list of them.
                let agents = agents.flat_map(|a| match a {
                    serde_json::Value::Array(list) => list.iter_mut().collect::<Vec<_>>(),
                    one => vec![one],
                });
                for agent in agents {
                    agent["image"] = json!(REFERENCE_AGENT_IMAGE);
                    if let Some((_, script)) = script {
                        agent["command"] = json!(["/bin/sh", "-c", script]);
                    }
                }
            }
            if !doc.is_null() {
                items.push(doc);
            }
        }
    }
    let path = cp.dir().join("examples-on-the-real-node.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json!({"apiVersion": "v1", "kind": "List", "items": items}))?)?;
    Ok(path)
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
        "{:<16} {:<22} {:<10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>7} {:>9} {:>8}",
        "NAMESPACE", "JOB", "PHASE", "EST P50", "EST P90", "ACTUAL", "SPENT", "TOKENS", "METERS", "ATTEMPTS", "ERROR"
    );
    for (ns, name) in JOBS {
        let job = Api::<AgentJob>::namespaced(client.clone(), ns).get(name).await?;
        let s = job.status.unwrap_or_default();
        let est = s.estimate.unwrap_or_default();
        let usage = s.usage.unwrap_or_default();
        let meter = s.meter.unwrap_or_default();
        println!(
            "{:<16} {:<22} {:<10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>7} {:>9} {:>8}",
            ns,
            name,
            s.phase.map(|p| p.as_str()).unwrap_or("-"),
            format!("${}", est.cost_usd.p50),
            format!("${}", est.cost_usd.p90),
            format!("${}", usage.cost_usd),
            if meter.spent_usd.is_empty() { "-".to_owned() } else { format!("${}", meter.spent_usd) },
            usage.total_tokens,
            meter.grants.len(),
            s.attempts.len(),
            usage.estimate_error_percent.map(|e| format!("{e:+}%")).unwrap_or_default(),
        );
    }
    Ok(())
}
