//! The operator in-cluster on a real node (tests/support/node.rs), installed with the chart as a
//! user would: `helm install` with the operator image made from the binary cargo built for this
//! test (deploy/images/debug-image.sh; the release image, `make image`, is the same layout but a
//! half-hour build), into a namespace that enforces the restricted Pod Security level.
//! - both replicas run and are Ready (probes answered to the kubelet), under their ServiceAccount,
//!   with the chart's limits in their cgroups; one of them holds the Lease; a privileged Pod is
//!   refused in the namespace; the metrics Service's endpoints serve /metrics;
//! - an AgentJob approved by two heads runs a real agent Pod to Succeeded, with its usage; a
//!   hostile agent reaches the apiserver through the `kubernetes` Service but has no token, and
//!   anonymous is refused the operator's Secrets there;
//! - an agent calls its model through the meter, whose budget comes from the operator's meter API
//!   at the chart's default grant URL, the Service's DNS name (CoreDNS resolves it, kube-proxy
//!   routes it): the job's usage is what the stand-in provider reported, token for token, and
//!   the grant is in its status; a Pod of another namespace that is not a meter, with a token for
//!   the meter API's audience, reaches the API by the same name and is refused;
//! - `helm upgrade` with a changed value rolls the Pods and keeps the jobs' state; the upgraded
//!   operator runs the next job;
//! - deleting the leader Pod, then hanging the next leader (SIGSTOP), while an agent runs, hands
//!   the Lease to the standby each time, and each job ends with exactly the one agent Pod it had
//!   (a watch sees every Pod ever created).
//!
//! Prints figures: time from `helm install` to both replicas Ready, failover time.
//! Needs root and runc (SKIPPED loudly otherwise; fails with AGENTGATE_REQUIRE_REAL_NODE).

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate::api::{AgentJob, Decision};
use agentgate::domain::meter_sidecar as sidecar;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use support::cluster::{agent_job, grant_voting_rights, job_pods, phase, vote};
use support::node::{
    self, BUSYBOX_IMAGE, NODE_IP, NODE_NAME, NodeOptions, OPERATOR_DEBUG_REPOSITORY, OPERATOR_DEBUG_TAG, REFERENCE_AGENT_IMAGE, RealNode,
};
use support::provider::StandInProvider;
use support::tools::helm;

const RELEASE: &str = "agentgate";
const SYSTEM: &str = "agentgate-system";
const TEAM: &str = "team-in-cluster";
/// Generous: the machine is small and may be busy with other test binaries.
const TIMEOUT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_runs_the_operator_in_cluster_on_a_real_node() {
    if !node::available_or_skip("in_cluster") {
        return;
    }
    let node = tokio::task::spawn_blocking(|| RealNode::start_with(NodeOptions { in_cluster: true }))
        .await
        .expect("starting the node")
        .unwrap_or_else(|e| panic!("{e:?}"));
    println!("figure: real node with in-cluster networking Ready in {:.2?}", node.started_in());
    let cp = node.control_plane();
    let admin = cp.client("admin").await;
    let t0 = Instant::now();
    let image = node.import_operator_debug_image().unwrap_or_else(|e| panic!("{e:?}"));
    println!("figure: operator debug image {image} made from the cargo build and imported in {:.2?}", t0.elapsed());

    // The operator's namespace as deploy/namespace.yaml makes it: restricted Pod Security enforced.
    let namespace = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/namespace.yaml");
    let applied = cp.kubectl("admin", &["apply", "--server-side", "-f", namespace.to_str().unwrap()]);
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    let installed = Instant::now();
    helm_ok(&node, &["install", RELEASE, "charts/agentgate", "--namespace", SYSTEM, "--take-ownership", "--force-conflicts"]);
    let pods = operator_pods_ready(&admin, 2).await;
    println!("figure: helm install → both operator replicas Running and Ready in {:.2?}", installed.elapsed());
    the_operator_runs_restricted_with_its_limits(&node, &admin, &pods).await;
    let leader = leader_pod(&admin, &pods).await;
    println!("leader: {leader}");
    metrics_are_served_at_the_services_endpoints(&admin).await;

    cp.namespace(TEAM).await;
    grant_voting_rights(&admin).await;
    let env = Env { admin: admin.clone(), alice: cp.client("alice").await, bob: cp.client("bob").await };
    let first = run_job(&env, "first", json!({})).await;
    // The reference agent calls no model: its meter measured nothing, which is the job's usage;
    // the agent's own claim is kept beside it, never counted.
    let status = first.status.as_ref().unwrap();
    let usage = status.usage.clone().unwrap();
    assert_eq!(usage.total_tokens, 0, "usage measured by the meter: {usage:?}");
    let claimed = status.attempts[0].reported_usage.clone().expect("the agent's claim kept");
    assert!(claimed.input_tokens > 0 && claimed.output_tokens > 0, "the agent's claim: {claimed:?}");

    a_hostile_agent_reaches_the_apiserver_but_has_no_credentials(&node, &env).await;
    let metered = a_metered_job_draws_its_budget_from_the_meter_api_by_service_name(&node, &env).await;
    a_pod_that_is_not_a_meter_is_refused_by_the_meter_api(&node, &env, &metered).await;
    helm_upgrade_keeps_the_jobs(&node, &env, &first).await;
    killing_the_leader_fails_over_without_a_second_agent_pod(&node, &env).await;

    let uninstall = helm_ok(&node, &["uninstall", RELEASE, "--namespace", SYSTEM, "--wait", "--timeout", "2m"]);
    assert!(uninstall.contains("uninstalled"), "{uninstall}");
    operator_pods_ready(&admin, 0).await;
    drop(node);
}

struct Env {
    admin: Client,
    alice: Client,
    bob: Client,
}

/// `helm <args> --set image...` against the node's control plane, from the crate's root; the image
/// is the debug build the node imported, never pulled.
fn helm_ok(node: &RealNode, args: &[&str]) -> String {
    let kubeconfig = node.control_plane().kubeconfig("admin");
    let mut command = std::process::Command::new(helm());
    command.current_dir(env!("CARGO_MANIFEST_DIR")).args(args).arg("--kubeconfig").arg(&kubeconfig);
    if matches!(args.first(), Some(&"install" | &"upgrade")) {
        command.args([
            "--set",
            &format!("image.repository={OPERATOR_DEBUG_REPOSITORY}"),
            "--set",
            &format!("image.tag={OPERATOR_DEBUG_TAG}"),
            "--set",
            "image.pullPolicy=Never",
        ]);
    }
    let out: Output = command.output().expect("running helm");
    assert!(
        out.status.success(),
        "helm {} failed: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls every 100 ms until `get` yields, or panics after [`TIMEOUT`].
async fn wait<T, F, Fut>(what: &str, get: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    support::cluster::wait_some(what, TIMEOUT, Duration::from_millis(100), get).await
}

fn is_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status.and_then(|s| s.conditions.as_ref()).is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until the release has exactly `n` Pods, all of one template and all Running and Ready
/// (no Pod of an older ReplicaSet left, none terminating), and returns them.
async fn operator_pods_ready(admin: &Client, n: usize) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), SYSTEM);
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), SYSTEM);
    wait(&format!("{n} operator Pods Ready"), || async {
        let list = pods.list(&ListParams::default().labels("app.kubernetes.io/instance=agentgate")).await.expect("list pods").items;
        if n == 0 {
            return list.is_empty().then_some(list);
        }
        let deployment = deployments.get_opt(RELEASE).await.expect("get deployment")?;
        let status = deployment.status.as_ref()?;
        let settled = status.observed_generation == deployment.metadata.generation
            && status.updated_replicas == Some(n as i32)
            && status.ready_replicas == Some(n as i32)
            && status.replicas == Some(n as i32);
        let all_ready = list.len() == n && list.iter().all(|p| is_ready(p) && p.metadata.deletion_timestamp.is_none());
        (settled && all_ready).then_some(list)
    })
    .await
}

/// Each replica: on the real node, under the chart's ServiceAccount and restricted security
/// context, with its memory limit in the host's cgroup; and the namespace refuses what the
/// restricted level forbids.
async fn the_operator_runs_restricted_with_its_limits(node: &RealNode, admin: &Client, pods: &[Pod]) {
    for pod in pods {
        let spec = pod.spec.as_ref().unwrap();
        let status = pod.status.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some(NODE_NAME));
        assert_eq!(spec.service_account_name.as_deref(), Some("agentgate"));
        assert_eq!(spec.containers[0].image.as_deref(), Some(format!("{OPERATOR_DEBUG_REPOSITORY}:{OPERATOR_DEBUG_TAG}").as_str()));
        let container = &status.container_statuses.as_ref().unwrap()[0];
        let id = container.container_id.as_deref().unwrap().trim_start_matches("containerd://");
        let qos = status.qos_class.as_deref().unwrap();
        let cgroup = node.container_cgroup("memory", qos, pod.metadata.uid.as_deref().unwrap(), id).join("memory.limit_in_bytes");
        let limit = std::fs::read_to_string(&cgroup).unwrap_or_else(|e| panic!("reading {}: {e}", cgroup.display()));
        assert_eq!(limit.trim(), (512 * 1024 * 1024).to_string(), "the chart's memory limit (512Mi) is the container's cgroup limit");
        println!("operator Pod {} ({qos}) Ready on {NODE_NAME}; memory.limit_in_bytes={}", pod.name_any(), limit.trim());
    }
    // A Pod the restricted level forbids is refused in the operator's namespace: the label is
    // enforced, so the operator Pods above passed it.
    // (A privileged one would be refused before, by the apiserver's --allow-privileged=false.)
    let unconfined: Pod = serde_json::from_value(json!({"metadata": {"name": "unconfined"}, "spec": {
        "containers": [{"name": "c", "image": REFERENCE_AGENT_IMAGE, "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}]}}))
    .unwrap();
    let refused = Api::<Pod>::namespaced(admin.clone(), SYSTEM)
        .create(&PostParams { dry_run: true, ..PostParams::default() }, &unconfined)
        .await
        .expect_err("a Pod adding a capability in the restricted namespace");
    assert!(refused.to_string().contains("violates PodSecurity \"restricted:latest\""), "{refused}");
}

/// The Pod whose name starts the Lease's holderIdentity (`<POD_NAME>-<random suffix>`), once one holds it.
async fn leader_pod(admin: &Client, pods: &[Pod]) -> String {
    let leases: Api<Lease> = Api::namespaced(admin.clone(), SYSTEM);
    wait("a replica holds the Lease", || async {
        let holder = leases.get_opt(RELEASE).await.expect("get lease")?.spec?.holder_identity?;
        pods.iter().map(|p| p.name_any()).find(|name| holder.starts_with(&format!("{name}-")))
    })
    .await
}

/// As Prometheus scrapes a Service: every ready endpoint of its EndpointSlices, by Pod IP.
async fn metrics_are_served_at_the_services_endpoints(admin: &Client) {
    for body in scrape_metrics(admin).await {
        assert!(body.contains("# EOF"), "an OpenMetrics exposition from {body}");
        assert!(body.contains("agentgate_"), "agentgate's metrics: {body}");
    }
    println!("metrics: both endpoints of Service {SYSTEM}/agentgate-metrics serve /metrics");
}

/// The meter API's failed TLS handshakes, summed over both replicas.
async fn tls_handshakes_failed(admin: &Client) -> u64 {
    let line = |l: &str| l.starts_with("agentgate_meter_api_requests_total{") && l.contains(r#"outcome="tls_handshake_failed""#);
    let value = |l: &str| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64;
    scrape_metrics(admin).await.iter().flat_map(|b| b.lines().filter(|l| line(l)).map(value).collect::<Vec<_>>()).sum()
}

/// /metrics of every ready endpoint of the metrics Service.
async fn scrape_metrics(admin: &Client) -> Vec<String> {
    let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), SYSTEM);
    let addresses = wait("the metrics Service's 2 ready endpoints", || async {
        let list = slices.list(&ListParams::default().labels("kubernetes.io/service-name=agentgate-metrics")).await.expect("list slices");
        let ready: Vec<String> = list
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .flat_map(|e| e.addresses.clone())
            .collect();
        (ready.len() == 2).then_some(ready)
    })
    .await;
    let mut bodies = Vec::new();
    for address in addresses {
        bodies.push(tokio::task::spawn_blocking(move || http_get(&address, 8080, "/metrics")).await.unwrap());
    }
    bodies
}

fn http_get(address: &str, port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect((address, port)).expect("connect to the operator Pod");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"), "{path}: {response}");
    response
}

fn job(name: &str, patch: serde_json::Value) -> AgentJob {
    let base = json!({
        "jobType": "in-cluster",
        "category": "in-cluster",
        "agents": {"primary": {"name": "agent", "image": REFERENCE_AGENT_IMAGE, "model": "gpt-4o-mini"}},
        "resources": {"cpu": "100m", "memory": "48Mi"},
        "budget": {"maxCostUSD": "5.00"},
        "input": {"text": "in-cluster operator, real agent"},
    });
    let mut job = agent_job(name, base, patch);
    job.metadata.namespace = Some(TEAM.into());
    job
}

/// Creates the job, has alice and bob approve it and waits until it Succeeded.
async fn run_job(env: &Env, name: &str, patch: serde_json::Value) -> AgentJob {
    let created = create_and_approve(env, name, patch).await;
    wait_succeeded(env, &created).await
}

async fn create_and_approve(env: &Env, name: &str, patch: serde_json::Value) -> AgentJob {
    let api: Api<AgentJob> = Api::namespaced(env.admin.clone(), TEAM);
    let created = api.create(&PostParams::default(), &job(name, patch)).await.expect("creating a job");
    vote(&env.alice, &created, "alice", Decision::Approve).await;
    vote(&env.bob, &created, "bob", Decision::Approve).await;
    created
}

async fn wait_succeeded(env: &Env, job: &AgentJob) -> AgentJob {
    let api: Api<AgentJob> = Api::namespaced(env.admin.clone(), TEAM);
    let name = job.name_any();
    let done = wait(&format!("job {name} Succeeded and learned"), || async {
        let j = api.get(&name).await.expect("get job");
        assert_ne!(phase(&j), Some("Failed"), "job {name} failed: {:#?}", j.status);
        // Settled: the operator marks an attempt learned (its usage in the estimator) after the
        // job Succeeded.
        let learned =
            serde_json::to_value(&j.status).unwrap()["attempts"].as_array().is_some_and(|a| a.iter().all(|a| a["learned"] == true));
        (phase(&j) == Some("Succeeded") && learned).then_some(j)
    })
    .await;
    let pods = job_pods(&env.admin, TEAM, &done).await;
    assert_eq!(pods.len(), 1, "one agent Pod for {name}");
    assert_eq!(pods[0].spec.as_ref().unwrap().node_name.as_deref(), Some(NODE_NAME));
    let terminated = pods[0].status.as_ref().unwrap().container_statuses.as_ref().unwrap()[0].state.clone().unwrap().terminated;
    assert_eq!(terminated.map(|t| t.exit_code), Some(0), "the agent container ran and exited 0 on the node");
    done
}

/// The agent is the tenant's code, and in-cluster it reaches the apiserver as the operator does
/// (the `kubernetes` Service). What stops it is credentials: its Pod mounts no ServiceAccount
/// token, so it can only be anonymous, and anonymous may not read the operator's Secrets.
async fn a_hostile_agent_reaches_the_apiserver_but_has_no_credentials(node: &RealNode, env: &Env) {
    // (busybox's wget cannot complete a TLS handshake with kube-apiserver, so the agent checks
    // the connection and the host makes the anonymous request to the address it leads to.)
    const PROBE: &str = r#"echo "token: $(cat /var/run/secrets/kubernetes.io/serviceaccount/token 2>&1)"
if echo | nc -w 5 "$KUBERNETES_SERVICE_HOST" "$KUBERNETES_SERVICE_PORT" >/dev/null 2>&1; then
  echo "apiserver $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT: reachable"
else
  echo "apiserver $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT: unreachable"
fi
exec /agent"#;
    let done = run_job(env, "hostile", json!({"agents": {"primary": {"command": ["/bin/sh", "-c", PROBE]}}})).await;
    let pod = &job_pods(&env.admin, TEAM, &done).await[0];
    let logs = Api::<Pod>::namespaced(env.admin.clone(), TEAM).logs(&pod.name_any(), &Default::default()).await.expect("agent logs");
    println!("hostile agent's probes:\n{}", logs.lines().take(2).collect::<Vec<_>>().join("\n"));
    assert!(logs.contains("token: cat: can't open '/var/run/secrets/kubernetes.io/serviceaccount/token'"), "no token mounted: {logs}");
    assert!(logs.contains(&format!("apiserver {}:443: reachable", node::KUBERNETES_SERVICE_IP)), "the agent reaches the apiserver: {logs}");
    let url = format!("{}/api/v1/namespaces/{SYSTEM}/secrets", node.control_plane().server());
    let anonymous = std::process::Command::new("curl").args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", &url]).output().expect("curl");
    assert_eq!(String::from_utf8_lossy(&anonymous.stdout), "403", "anonymous may not list the operator's Secrets");
}

/// The chart's default grant URL: the meter API Service's DNS name, no address anywhere.
fn meter_api_url() -> String {
    format!("https://agentgate-meter-api.{SYSTEM}.svc:8444")
}

/// The team's keys Secret points the meters at the stand-in provider on the host; the agent makes
/// one Chat Completions call through its meter, which draws the job's budget from the meter API
/// by the Service's name (the chart sets no grant URL). The job's usage is the meter's
/// measurement, equal to what the provider reported, and the one grant that paid for it is
/// recorded and settled in status.
async fn a_metered_job_draws_its_budget_from_the_meter_api_by_service_name(node: &RealNode, env: &Env) -> AgentJob {
    let provider = StandInProvider::start(NODE_IP, node.control_plane().dir()).unwrap_or_else(|e| panic!("{e:?}"));
    let key = format!("sk-in-cluster-{}", std::process::id());
    let secret: Secret = serde_json::from_value(json!({"metadata": {"name": sidecar::DEFAULT_KEYS_SECRET,
        "annotations": {sidecar::ANNOTATION_OPENAI_UPSTREAM: provider.openai_upstream()}}, "stringData": {"openai": key}}))
    .unwrap();
    Api::<Secret>::namespaced(env.admin.clone(), TEAM).create(&PostParams::default(), &secret).await.expect("the keys Secret");

    let started = Instant::now();
    let done = run_job(env, "metered", json!({"input": {"chat": "how many tokens is this prompt"}})).await;
    println!("figure: metered job (one call, grant by Service name) create → Succeeded in {:.2?}", started.elapsed());
    let pod = &job_pods(&env.admin, TEAM, &done).await[0];
    let meter =
        pod.spec.as_ref().unwrap().init_containers.iter().flatten().find(|c| c.name == sidecar::CONTAINER).expect("the meter sidecar");
    let args = meter.args.clone().unwrap_or_default().join(" ");
    assert!(args.contains(&format!("--grant-url {}", meter_api_url())), "the meter uses the Service's name: {args}");

    let calls = provider.calls().unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(calls.len(), 1, "one call reached the provider: {calls:?}");
    assert_eq!(calls[0]["authorization"], json!(format!("Bearer {key}")), "the provider saw the Secret's key");
    let reported = &calls[0]["usage"];
    let status = serde_json::to_value(done.status.as_ref()).unwrap();
    let usage = &status["usage"];
    assert_eq!(
        (&usage["inputTokens"], &usage["cachedInputTokens"], &usage["outputTokens"]),
        (&reported["input"], &reported["cached"], &reported["output"]),
        "status.usage is what the provider reported: {status}"
    );
    let grants = status["meter"]["grants"].as_array().cloned().unwrap_or_default();
    assert_eq!(grants.len(), 1, "one meter drew on the budget: {status}");
    assert_eq!(grants[0]["pod"], json!(pod.name_any()), "{status}");
    assert_eq!(grants[0]["settled"], json!(true), "the meter settled as it stopped: {status}");
    println!("metered job: provider reported {reported}; status.usage {usage}; grant {}", grants[0]);
    done
}

/// A Pod in another namespace, not a meter of any job, mounts a token for the meter API's
/// audience (any Pod may project one for its own ServiceAccount) and calls the API by the
/// Service's name in plain HTTP, once speaking for the metered job's Pod and once for itself:
/// the API speaks only TLS, so neither gets an HTTP answer, both are counted as failed
/// handshakes, and the job's grants are as they were. (Over TLS, with a real Pod-bound token,
/// `tests/meter_grants.rs` checks the refusals `pod_mismatch` and `not_an_agent_pod`: busybox's
/// TLS offers only CBC suites with ECDSA, which rustls rightly refuses, so it cannot make that
/// call from here.)
async fn a_pod_that_is_not_a_meter_is_refused_by_the_meter_api(node: &RealNode, env: &Env, metered: &AgentJob) {
    const INTRUDER: &str = "intruder";
    node.control_plane().namespace(INTRUDER).await;
    let victim = job_pods(&env.admin, TEAM, metered).await[0].name_any();
    let host = format!("agentgate-meter-api.{SYSTEM}.svc");
    let failed_before = tls_handshakes_failed(&env.admin).await;
    // busybox nc: raw HTTP; its input stays open a while (nc drops the connection when its input
    // ends, maybe before an answer).
    let script = format!(
        r#"token=$(cat /var/run/secrets/meter/token)
ask() {{
  {{ printf 'POST /v1/sync HTTP/1.0\r\nHost: {host}\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\n\r\n%s' \
    "$token" "${{#1}}" "$1"; sleep 2; }} | nc -w 10 {host} 8444
}}
for body in '{{"pod":"{victim}","session":"intruder","sequence":1,"usage":{{"inputTokens":0,"cachedInputTokens":0,"outputTokens":0,"totalTokens":0,"costUSD":"0"}},"wantUSD":"5.00"}}' '{{"session":"intruder","sequence":1,"usage":{{"inputTokens":0,"cachedInputTokens":0,"outputTokens":0,"totalTokens":0,"costUSD":"0"}},"wantUSD":"5.00"}}'; do
  ask "$body" | tr -c '[:print:]' '.'
  echo " (nc exit $?)"
done"#
    );
    let intruder: Pod = serde_json::from_value(json!({"metadata": {"name": "not-a-meter"}, "spec": {
        "restartPolicy": "Never", "automountServiceAccountToken": false,
        "containers": [{"name": "c", "image": BUSYBOX_IMAGE, "command": ["/bin/sh", "-c", script],
                        "volumeMounts": [{"name": "token", "mountPath": "/var/run/secrets/meter"}]}],
        "volumes": [{"name": "token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": sidecar::TOKEN_AUDIENCE, "path": "token", "expirationSeconds": 600}}]}}]}}))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), INTRUDER);
    // The namespace's default ServiceAccount comes from kube-controller-manager, just after it.
    wait("the intruder Pod created", || async { pods.create(&PostParams::default(), &intruder).await.ok() }).await;
    let logs = wait("the intruder Pod finished", || async {
        let pod = pods.get("not-a-meter").await.expect("get the intruder Pod");
        let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            Some(pods.logs("not-a-meter", &Default::default()).await.expect("the intruder's log"))
        } else {
            None
        }
    })
    .await;
    println!("the intruder's calls to {host}:8444:\n{logs}");
    assert!(!logs.contains("HTTP/1."), "no HTTP answer from a TLS-only API: {logs}");
    // Positive evidence that both calls reached the API (by the Service's name, through
    // kube-proxy) and were refused there.
    let failed = wait("the intruder's 2 failed handshakes counted", || async {
        let now = tls_handshakes_failed(&env.admin).await;
        (now >= failed_before + 2).then_some(now)
    })
    .await;
    println!("meter API: tls_handshake_failed {failed_before} -> {failed}");
    let again = Api::<AgentJob>::namespaced(env.admin.clone(), TEAM).get(&metered.name_any()).await.expect("get the metered job");
    let meter = |j: &AgentJob| serde_json::to_value(j.status.as_ref()).unwrap()["meter"].clone();
    assert_eq!(meter(&again), meter(metered), "the refused calls changed no grant");
}

/// `helm upgrade` with one changed value: new Pods replace both replicas; the finished job's
/// status is as it was and no Pod of it is created again; the upgraded operator runs a new job.
async fn helm_upgrade_keeps_the_jobs(node: &RealNode, env: &Env, first: &AgentJob) {
    let deployments: Api<Deployment> = Api::namespaced(env.admin.clone(), SYSTEM);
    let before = deployments.get(RELEASE).await.unwrap().metadata.generation;
    let started = Instant::now();
    helm_ok(node, &["upgrade", RELEASE, "charts/agentgate", "--namespace", SYSTEM, "--reuse-values", "--set", "log.level=debug"]);
    let deployment = deployments.get(RELEASE).await.unwrap();
    assert!(deployment.metadata.generation > before, "the changed value changed the Deployment");
    let env_var = |d: &Deployment| {
        let container = &d.spec.template.spec.as_ref().unwrap().containers[0];
        container.env.as_ref().unwrap().iter().find(|e| e.name == "RUST_LOG").and_then(|e| e.value.clone())
    };
    assert_eq!(env_var(&deployment).as_deref(), Some("debug"));
    let pods = operator_pods_ready(&env.admin, 2).await;
    let hash = |p: &Pod| p.labels().get("pod-template-hash").cloned();
    assert!(pods.iter().all(|p| hash(p) == hash(&pods[0])), "both replicas run the new template");
    println!("figure: helm upgrade → both replicas replaced and Ready in {:.2?}", started.elapsed());

    // The new leader acts (it runs a new job) before the old job is compared: had it redone the
    // finished one, that would show by now.
    run_job(env, "after-upgrade", json!({})).await;
    let api: Api<AgentJob> = Api::namespaced(env.admin.clone(), TEAM);
    let again = api.get(&first.name_any()).await.unwrap();
    assert_eq!(
        serde_json::to_value(&again.status).unwrap(),
        serde_json::to_value(&first.status).unwrap(),
        "the upgrade kept the finished job's status"
    );
    assert_eq!(job_pods(&env.admin, TEAM, &again).await.len(), 1, "no second Pod for the finished job");
}

/// While an agent runs, the leader goes away twice: its Pod is deleted (as by a rollout or a
/// drain: SIGTERM, it gives the Lease back), then the next leader's process hangs (SIGSTOP from
/// the host: its Lease must lapse). Each time another process leads, the job
/// Succeeded, and a watch that saw every Pod ever created in the team's namespace saw exactly one
/// agent Pod for it.
async fn killing_the_leader_fails_over_without_a_second_agent_pod(node: &RealNode, env: &Env) {
    let seen: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let watch = {
        let (pods, seen) = (Api::<Pod>::namespaced(env.admin.clone(), TEAM), seen.clone());
        tokio::spawn(async move {
            let mut stream = watcher(pods, watcher::Config::default()).applied_objects().boxed();
            while let Some(Ok(pod)) = stream.next().await {
                seen.lock().unwrap().insert(pod.uid().unwrap(), pod.name_any());
            }
        })
    };
    let operator_pods = Api::<Pod>::namespaced(env.admin.clone(), SYSTEM);
    let leases: Api<Lease> = Api::namespaced(env.admin.clone(), SYSTEM);
    let list_operator_pods =
        || async { operator_pods.list(&ListParams::default().labels("app.kubernetes.io/instance=agentgate")).await.unwrap().items };

    // 1. The leader's Pod deleted.
    let created = agent_running(env, "deleted-leader").await;
    let leader = leader_pod(&env.admin, &list_operator_pods().await).await;
    let deleted = Instant::now();
    operator_pods.delete(&leader, &DeleteParams::default()).await.expect("deleting the leader Pod");
    let new_holder = wait("another replica takes the Lease", || async {
        let holder = leases.get(RELEASE).await.expect("get lease").spec?.holder_identity?;
        (!holder.starts_with(&format!("{leader}-"))).then_some(holder)
    })
    .await;
    println!("figure: leader Pod {leader} deleted → {new_holder} holds the Lease in {:.2?}", deleted.elapsed());
    wait_succeeded(env, &created).await;
    println!("figure: leader Pod deleted → the job it was running Succeeded in {:.2?}", deleted.elapsed());

    // 2. The new leader hangs (SIGSTOP from the host): it neither renews nor gives the Lease back,
    // so the standby may lead only once the Lease lapses. Then it is SIGKILLed; the kubelet
    // restarts its container, which finds the Lease held by another and stands by.
    let created = agent_running(env, "hung-leader").await;
    let pods = list_operator_pods().await;
    let leader = leader_pod(&env.admin, &pods).await;
    let pod = pods.iter().find(|p| p.name_any() == leader).unwrap();
    let status = pod.status.as_ref().unwrap();
    let id = status.container_statuses.as_ref().unwrap()[0].container_id.clone().unwrap();
    let procs = node
        .container_cgroup(
            "memory",
            status.qos_class.as_deref().unwrap(),
            pod.metadata.uid.as_deref().unwrap(),
            id.trim_start_matches("containerd://"),
        )
        .join("cgroup.procs");
    let pids = std::fs::read_to_string(&procs).unwrap_or_else(|e| panic!("reading {}: {e}", procs.display()));
    let signal = |signal: &str| {
        for pid in pids.split_whitespace() {
            let out = std::process::Command::new("kill").args([signal, pid]).output().expect("running kill");
            assert!(out.status.success(), "kill {signal} {pid}: {}", String::from_utf8_lossy(&out.stderr));
        }
    };
    let hung = Instant::now();
    signal("-STOP");
    let new_holder = wait("the standby takes the hung leader's Lease", || async {
        let holder = leases.get(RELEASE).await.expect("get lease").spec?.holder_identity?;
        (!holder.starts_with(&format!("{leader}-"))).then_some(holder)
    })
    .await;
    println!(
        "figure: leader {leader} hung (SIGSTOP) → {new_holder} holds the Lease in {:.2?} (it lapses 15 s after its last renewal)",
        hung.elapsed()
    );
    signal("-KILL");
    wait_succeeded(env, &created).await;
    println!("figure: leader hung → the job it was running Succeeded in {:.2?}", hung.elapsed());

    // The current leader acts on a new job before the count: a duplicate it would create for an
    // earlier one would be visible by then.
    run_job(env, "after-failover", json!({})).await;
    let seen = seen.lock().unwrap().clone();
    for job in ["deleted-leader", "hung-leader"] {
        let ever: Vec<&String> = seen.values().filter(|name| name.starts_with(&format!("{job}-"))).collect();
        assert_eq!(ever.len(), 1, "agent Pods ever created for job {job}: {ever:?}");
    }
    watch.abort();
}

/// Creates and approves a job whose agent sleeps 6 s before its work, and waits until its Pod
/// runs: long enough for a leader to go away meanwhile.
async fn agent_running(env: &Env, name: &str) -> AgentJob {
    let created =
        create_and_approve(env, name, json!({"agents": {"primary": {"command": ["/bin/sh", "-c", "sleep 6; exec /agent"]}}})).await;
    wait(&format!("the {name} job's agent Running"), || async {
        let pods = job_pods(&env.admin, TEAM, &created).await;
        pods.first().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")).map(|_| ())
    })
    .await;
    created
}
