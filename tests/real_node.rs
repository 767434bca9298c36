//! End to end on a real node (tests/support/node.rs): the operator, run out-of-cluster as in the
//! other integration tests, starts agent Pods that containerd and runc really run, and the limits
//! of an AgentJob are enforced by the kernel, not just written into a Pod spec:
//! - the agent reads `spec.input` as written, `$(VAR)` and `$$` included (the kubelet would expand
//!   them in an env value the operator did not escape);
//! - the agent's cgroup CPU quota and memory limit equal the job's `resources` (reported by the
//!   reference agent from inside, and read from the host's cgroup fs);
//! - an agent over its memory limit is OOMKilled and the attempt is recorded as failed, with its
//!   meter's measurement as usage and its own report kept beside it;
//! - `maxExecutionSeconds` kills a runaway agent (activeDeadlineSeconds), and the job says so;
//! - a fake extended resource (`nvidia.com/gpu: 2` in the Node's capacity) gates GPU jobs.
//!
//! Also checks the node's authentication (anonymous kubelet access refused, NodeRestriction) and
//! prints figures: node start time, create→Running and create→Succeeded of a trivial Pod.
//!
//! Needs root and runc; otherwise it says SKIPPED loudly (and fails when
//! AGENTGATE_REQUIRE_REAL_NODE is set, as in CI). One test function: the node is shared by every
//! step and torn down when it ends, also when a step fails.

mod support;

use std::time::{Duration, Instant};

use agentgate::api::{AgentJob, AttemptResult, Decision};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::cluster::{agent_job, condition, grant_voting_rights, job_pods, phase, vote};
use support::controlplane::OperatorProcess;
use support::node::{self, BUSYBOX_IMAGE, NODE_IP, NODE_NAME, REFERENCE_AGENT_IMAGE, RealNode};

const NS: &str = "real-node";
/// Generous: the machine is small and may be busy with other test binaries.
const TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_pods_run_on_a_real_node_with_enforced_limits() {
    if !node::available_or_skip("real_node") {
        return;
    }
    let node = tokio::task::spawn_blocking(RealNode::start).await.expect("starting the node").unwrap_or_else(|e| panic!("{e:?}"));
    println!("figure: real node (control plane + containerd + kubelet + scheduler) Ready in {:.2?}", node.started_in());
    let cp = node.control_plane();
    cp.namespace(NS).await;
    let admin = cp.client("admin").await;

    node_authentication_is_enforced(&node, &admin).await;
    trivial_pod_figures(&admin).await;
    the_operator_image_runs_under_the_restricted_security_context(&node, &admin).await;

    grant_voting_rights(&admin).await;
    let env = Env { admin: admin.clone(), alice: cp.client("alice").await, bob: cp.client("bob").await };
    // Every agent Pod has the meter sidecar (keyless here: NS has no keys Secret), from this build.
    let meter_image = "local.test/agentgate:debug";
    node.import_debug_agentgate_image(std::path::Path::new(env!("CARGO_BIN_EXE_agentgate")), meter_image)
        .unwrap_or_else(|e| panic!("{e:?}"));
    let operator = OperatorProcess::start(
        cp,
        &["--namespace", NS, "--metrics-addr", "127.0.0.1:0", "--meter-image", meter_image, "--meter-budget-mode", "fixed"],
    );

    limits_equal_the_jobs_resources(&env).await;
    the_agent_receives_spec_input_as_written(&env).await;
    over_its_memory_limit_an_agent_is_oom_killed_and_its_report_kept(&env).await;
    a_runaway_agent_is_stopped_at_max_execution_seconds(&env, &node).await;
    gpu_jobs_run_only_when_the_node_has_the_gpus(&env).await;
    jobs_per_second(&env).await;

    drop(operator);
    drop(node);
}

struct Env {
    admin: Client,
    alice: Client,
    bob: Client,
}

/// The kubelet refuses anonymous callers; the apiserver reaches it with its client certificate
/// (logs, proxy); the node's own credentials are confined by the Node authorizer and
/// NodeRestriction.
async fn node_authentication_is_enforced(node: &RealNode, admin: &Client) {
    let anonymous = std::process::Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", &format!("https://{NODE_IP}:{}/pods", node::KUBELET_PORT)])
        .output()
        .expect("running curl");
    assert_eq!(String::from_utf8_lossy(&anonymous.stdout), "401", "an anonymous request to the kubelet API must be refused");

    let cp = node.control_plane();
    let proxied = cp.kubectl("admin", &["get", "--raw", &format!("/api/v1/nodes/{NODE_NAME}/proxy/healthz")]);
    assert!(
        proxied.status.success() && String::from_utf8_lossy(&proxied.stdout) == "ok",
        "the apiserver reaches the kubelet with its client certificate: {}",
        String::from_utf8_lossy(&proxied.stderr)
    );

    // Another Node: the node's credentials may not touch it (NodeRestriction), nor read Secrets
    // of Pods not bound to it (Node authorizer).
    let nodes: Api<Node> = Api::all(admin.clone());
    let other: Node = serde_json::from_value(json!({"metadata": {"name": "some-other-node"}})).unwrap();
    nodes.create(&PostParams::default(), &other).await.expect("creating another Node");
    let label = node.kubectl_as_node(&["label", "node", "some-other-node", "stolen=yes"]);
    assert!(!label.status.success(), "the node labelled another Node");
    assert!(String::from_utf8_lossy(&label.stderr).contains("Forbidden"), "{}", String::from_utf8_lossy(&label.stderr));
    let own = node.kubectl_as_node(&["get", "node", NODE_NAME, "-o", "name"]);
    assert!(own.status.success(), "the node reads itself: {}", String::from_utf8_lossy(&own.stderr));
    let secrets = node.kubectl_as_node(&["get", "secrets", "-n", NS]);
    assert!(String::from_utf8_lossy(&secrets.stderr).contains("Forbidden"), "node listed secrets: {secrets:?}");
    nodes.delete("some-other-node", &DeleteParams::default()).await.expect("deleting the other Node");
    println!("node authentication: anonymous kubelet access 401, apiserver→kubelet proxy ok, NodeRestriction and Node authorizer enforced");
}

/// create→Running of a sleeping Pod and create→Succeeded of one that exits at once, straight
/// through the API (no operator), timed by polling every 20 ms.
async fn trivial_pod_figures(admin: &Client) {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let pod = |name: &str, command: &[&str]| -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {
            "restartPolicy": "Never", "automountServiceAccountToken": false, "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "main", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never", "command": command,
                            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "100m", "memory": "32Mi"}}}]}}))
        .unwrap()
    };
    for (name, command, want) in
        [("trivial-running", &["/bin/sleep", "3600"][..], "Running"), ("trivial-succeeded", &["/bin/true"][..], "Succeeded")]
    {
        let created = Instant::now();
        pods.create(&PostParams::default(), &pod(name, command)).await.expect("creating a trivial Pod");
        wait(&format!("Pod {name} {want}"), || async {
            let p = pods.get(name).await.expect("get pod");
            let ph = p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
            assert!(ph != "Failed", "trivial Pod failed: {:#?}", p.status);
            (ph == want).then_some(())
        })
        .await;
        println!("figure: trivial Pod create→{want} {:.2?}", created.elapsed());
        pods.delete(name, &DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() }).await.expect("deleting");
    }
}

/// The image `make image` built (if it did): imported into the node's containerd, it runs as a
/// Pod with the chart's security context (non-root from the image's own USER, read-only root
/// filesystem, no capabilities, RuntimeDefault seccomp). It prints the CRDs, which needs no API.
async fn the_operator_image_runs_under_the_restricted_security_context(node: &RealNode, admin: &Client) {
    let version = env!("CARGO_PKG_VERSION");
    let tarball = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/images/agentgate-{version}.tar"));
    if !tarball.exists() {
        let note = format!("\nNOTE: {} is not built (`make image`): the operator image was not run on the node.\n\n", tarball.display());
        let _ = std::io::Write::write_all(&mut std::io::stderr(), note.as_bytes());
        return;
    }
    let image = format!("ghcr.io/agentgate/agentgate:{version}");
    node.import_image(&tarball, &image).unwrap_or_else(|e| panic!("{e:?}"));
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "operator-image"}, "spec": {
        "restartPolicy": "Never", "automountServiceAccountToken": false,
        "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "agentgate", "image": image, "imagePullPolicy": "Never", "args": ["crds"],
            "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
            "resources": {"limits": {"cpu": "200m", "memory": "64Mi"}}}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.expect("creating the operator image Pod");
    wait("the operator image Pod Succeeded", || async {
        let p = pods.get("operator-image").await.expect("get pod");
        let phase = p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
        assert_ne!(phase, "Failed", "the operator image failed: {:#?}", p.status);
        (phase == "Succeeded").then_some(())
    })
    .await;
    let logs = pods.logs("operator-image", &Default::default()).await.expect("logs");
    assert!(logs.contains("kind: CustomResourceDefinition"), "agentgate crds printed: {logs}");
    println!("operator image {image} ran on the node as non-root with a read-only root filesystem ({} bytes of CRDs)", logs.len());
}

fn job(name: &str, patch: Value) -> AgentJob {
    let base = json!({
        "jobType": "real-node",
        "category": "real-node",
        "agents": {"primary": {"name": "agent", "image": REFERENCE_AGENT_IMAGE, "model": "gpt-4o-mini"}},
        // Small: requests equal limits (Guaranteed) and this node has 2 CPUs.
        "resources": {"cpu": "250m", "memory": "96Mi"},
        "budget": {"maxCostUSD": "5.00"},
        "input": {"text": "the quick brown fox jumps over the lazy dog"},
    });
    let mut job = agent_job(name, base, patch);
    job.metadata.namespace = Some(NS.into());
    job
}

async fn create_and_approve(env: &Env, job: &AgentJob) -> AgentJob {
    let api: Api<AgentJob> = Api::namespaced(env.admin.clone(), NS);
    let created = api.create(&PostParams::default(), job).await.expect("creating job");
    vote(&env.alice, &created, "alice", Decision::Approve).await;
    vote(&env.bob, &created, "bob", Decision::Approve).await;
    created
}

async fn wait_job(env: &Env, name: &str, what: &str, done: impl Fn(&AgentJob) -> bool) -> AgentJob {
    let api: Api<AgentJob> = Api::namespaced(env.admin.clone(), NS);
    wait(what, || async {
        let j = api.get(name).await.expect("get job");
        done(&j).then_some(j)
    })
    .await
}

/// Polls every 20 ms until `get` yields, or panics after [`TIMEOUT`].
async fn wait<T, F, Fut>(what: &str, get: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    support::cluster::wait_some(what, TIMEOUT, Duration::from_millis(20), get).await
}

fn status_json(job: &AgentJob) -> Value {
    serde_json::to_value(job.status.as_ref()).unwrap()
}

/// The reference agent reads its limits from /sys/fs/cgroup and reports them in its output.
async fn limits_equal_the_jobs_resources(env: &Env) {
    let created = Instant::now();
    let j = create_and_approve(env, &job("limits", json!({}))).await;
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), NS);
    let done = wait_job(env, "limits", "job limits Succeeded", |j| {
        assert_ne!(phase(j), Some("Failed"), "job failed: {:#?}", j.status);
        phase(j) == Some("Succeeded")
    })
    .await;
    println!("figure: AgentJob create (+2 votes)→Succeeded with the reference agent {:.2?}", created.elapsed());
    let status = status_json(&done);
    let limits = &status["output"]["limits"];
    println!("limits read by the agent inside its Pod: {limits}");
    assert_eq!(limits["memoryBytes"], json!(96 * 1024 * 1024), "memory limit = resources.memory (96Mi)");
    assert_eq!(limits["cpuQuotaMicros"], json!(25_000), "CPU quota = 250m of a 100 ms period");
    assert_eq!(limits["cpuPeriodMicros"], json!(100_000));
    // {"text":"the quick brown fox jumps over the lazy dog"}: the key and nine words
    assert_eq!(status["output"]["inputWords"], json!(10), "the agent did its work on AGENTGATE_INPUT");
    // The reference agent calls no model: its meter measured nothing, and that is the job's usage;
    // what the agent claims is kept beside it, never counted (its meter's termination message
    // says 0 calls).
    let usage = &status["usage"];
    assert_eq!(usage["totalTokens"].as_i64(), Some(0), "usage measured by the meter: {usage}");
    let claimed = &status["attempts"][0]["reportedUsage"];
    assert!(
        claimed["inputTokens"].as_i64().unwrap() > 0 && claimed["outputTokens"].as_i64().unwrap() > 0,
        "the agent's claim kept: {claimed}"
    );
    let pod = &job_pods(&env.admin, NS, &j).await[0];
    assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some(NODE_NAME), "bound by the scheduler to the real node");
    let logs = pods.logs(&pod.name_any(), &Default::default()).await.expect("kubectl logs through apiserver → kubelet");
    assert!(logs.contains("\"usage\""), "the agent's log holds its report: {logs}");
}

/// The kubelet expands `$(VAR)` in env values and turns `$$` into `$`: without the operator's
/// escaping (`pod_builder::plain_env`) an input holding either would reach the agent other than
/// the heads approved it. Here a real kubelet hands the reference agent AGENTGATE_INPUT, and the
/// agent's SHA-256 of what it read must be that of `spec.input` as stored.
async fn the_agent_receives_spec_input_as_written(env: &Env) {
    let input = json!({"shell": "kill $$; echo $(AGENTGATE_JOB) $(HOME) $(NO_SUCH_VAR) $$$$ $"});
    create_and_approve(env, &job("dollars", json!({"input": input}))).await;
    let done = wait_job(env, "dollars", "job dollars Succeeded", |j| {
        assert_ne!(phase(j), Some("Failed"), "job failed: {:#?}", j.status);
        phase(j) == Some("Succeeded")
    })
    .await;
    // As the operator renders it (agent_pods.rs): the stored input's JSON text.
    let written = done.spec.input.as_ref().expect("spec.input").to_string();
    assert!(written.contains("$(AGENTGATE_JOB)") && written.contains("$$"), "the input as stored: {written}");
    let digest = ring::digest::digest(&ring::digest::SHA256, written.as_bytes());
    let expected: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let output = &status_json(&done)["output"];
    println!("the agent read {} bytes of AGENTGATE_INPUT, sha256 {}", output["inputBytes"], output["inputSha256"]);
    assert_eq!(output["inputBytes"], json!(written.len()), "AGENTGATE_INPUT as written: {written}");
    assert_eq!(output["inputSha256"], json!(expected), "AGENTGATE_INPUT as written: {written}");
}

async fn over_its_memory_limit_an_agent_is_oom_killed_and_its_report_kept(env: &Env) {
    let report = r#"{"usage":[{"model":"gpt-4o-mini","inputTokens":4000,"cachedInputTokens":0,"outputTokens":500}]}"#;
    // Reports first (as an agent that has already called its model would), then allocates
    // 256 MiB (busybox dd touches its whole buffer) under a 48 MiB limit.
    let script = format!("printf '%s' '{report}' > /dev/termination-log; exec dd if=/dev/zero of=/dev/null bs=256M count=1");
    let j = job(
        "oom",
        json!({"resources": {"cpu": "100m", "memory": "48Mi"},
                               "agents": {"primary": {"command": ["/bin/sh", "-c", script]}}}),
    );
    create_and_approve(env, &j).await;
    let done = wait_job(env, "oom", "job oom Failed", |j| phase(j) == Some("Failed")).await;
    let status = done.status.as_ref().unwrap();
    let attempt = &status.attempts[0];
    assert_eq!(attempt.result, AttemptResult::Failed);
    let pod = &job_pods(&env.admin, NS, &done).await[0];
    let terminated =
        pod.status.as_ref().unwrap().container_statuses.as_ref().unwrap()[0].state.as_ref().unwrap().terminated.clone().unwrap();
    println!("OOM: the agent container terminated: {terminated:?}");
    assert_eq!((terminated.reason.as_deref(), terminated.exit_code), (Some("OOMKilled"), 137), "the kernel killed it");
    let failed = condition(&done, "Succeeded").expect("Succeeded condition");
    println!("OOM: attempt 1 {:?}: {}", attempt.result, failed.message);
    // The job names the kill. Whether as OOMKilled depends on a race on the node: containerd's OOM
    // event can reach the kubelet after the exit, so the first Failed status the operator
    // settles on may say only "Error" with exit code 137 (the kubelet corrects it a moment later).
    assert!(
        failed.message.contains("oom-agent-1-agentgate: OOMKilled (exit code 137)")
            || failed.message.contains("oom-agent-1-agentgate: exit code 137"),
        "the job names the failed agent and its kill: {}",
        failed.message
    );
    // Its meter measured no call (this agent calls no model): that is the attempt's usage, and the
    // agent's own report is kept beside it, never counted. An OOM-killed agent's metered calls
    // are counted in tests/real_node_meter.rs.
    let usage = attempt.usage.as_ref().expect("the failed attempt keeps its usage");
    assert_eq!(usage.total_tokens, 0, "the meter's measurement: {usage:?}");
    let claimed = attempt.reported_usage.as_ref().expect("the OOM-killed agent's report kept");
    assert_eq!((claimed.input_tokens, claimed.output_tokens), (4000, 500), "the OOM-killed agent's report kept");
}

/// A busy loop under `cpu: 200m`: the host's cgroup fs shows the quota and the throttling, and
/// maxExecutionSeconds ends it.
async fn a_runaway_agent_is_stopped_at_max_execution_seconds(env: &Env, node: &RealNode) {
    let j = job(
        "runaway",
        json!({"resources": {"cpu": "200m", "memory": "64Mi"}, "limits": {"maxExecutionSeconds": 6},
               "agents": {"primary": {"command": ["/bin/sh", "-c", "while :; do :; done"]}}}),
    );
    let created = create_and_approve(env, &j).await;
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), NS);
    // While it runs: its limits as the host's kernel holds them.
    let running = wait("runaway Pod Running", || async {
        let p = job_pods(&env.admin, NS, &created).await.into_iter().next()?;
        let st = p.status.as_ref()?;
        let id = st.container_statuses.as_ref()?.first()?.container_id.clone()?;
        (st.phase.as_deref() == Some("Running")).then(|| (p.metadata.uid.clone().unwrap(), st.qos_class.clone().unwrap(), id))
    })
    .await;
    let (uid, qos, id) = running;
    let id = id.trim_start_matches("containerd://");
    let read = |controller: &str, file: &str| {
        let path = node.container_cgroup(controller, &qos, &uid, id).join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())).trim().to_owned()
    };
    let quota = read("cpu", "cpu.cfs_quota_us");
    let period = read("cpu", "cpu.cfs_period_us");
    let memory = read("memory", "memory.limit_in_bytes");
    println!(
        "host cgroup of the runaway agent ({qos}): cpu.cfs_quota_us={quota} cpu.cfs_period_us={period} memory.limit_in_bytes={memory}"
    );
    assert_eq!((quota.as_str(), period.as_str(), memory.as_str()), ("20000", "100000", "67108864"));
    // Throttled: wait until the kernel reports throttled periods (evidence, not a sleep).
    let throttled = wait("the busy loop throttled", || async {
        let stat = read("cpu", "cpu.stat");
        let n: u64 = stat.lines().find_map(|l| l.strip_prefix("nr_throttled ")).and_then(|v| v.parse().ok()).unwrap_or(0);
        (n >= 3).then_some(stat)
    })
    .await;
    println!("cpu.stat of the runaway agent: {}", throttled.replace('\n', ", "));

    let done = wait_job(env, "runaway", "job runaway Failed", |j| phase(j) == Some("Failed")).await;
    let pod = pods.get(&done.status.as_ref().unwrap().attempts[0].pods[0]).await.expect("the runaway Pod");
    let pod_status = pod.status.as_ref().unwrap();
    assert_eq!(pod_status.reason.as_deref(), Some("DeadlineExceeded"), "the kubelet enforced activeDeadlineSeconds: {pod_status:#?}");
    assert_eq!(pod.spec.as_ref().unwrap().active_deadline_seconds, Some(6));
    let failed = condition(&done, "Succeeded").expect("Succeeded condition");
    println!("deadline: {}", failed.message);
    assert!(failed.message.contains("DeadlineExceeded"), "the job says why: {}", failed.message);
}

/// `nvidia.com/gpu: 2` in the Node's capacity (as a device plugin would advertise it): a job
/// asking for 3 waits without a Pod; two asking for 2 each run one after the other; raising the
/// capacity to 3 lets the waiting one run.
async fn gpu_jobs_run_only_when_the_node_has_the_gpus(env: &Env) {
    let nodes: Api<Node> = Api::all(env.admin.clone());
    let set_gpus = |n: &'static str| {
        let nodes = nodes.clone();
        async move {
            let patch = json!({"status": {"capacity": {"nvidia.com/gpu": n}}});
            nodes.patch_status(NODE_NAME, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patching node capacity");
            wait(&format!("allocatable nvidia.com/gpu = {n}"), || async {
                let node = nodes.get(NODE_NAME).await.expect("get node");
                let alloc = node.status?.allocatable?;
                (alloc.get("nvidia.com/gpu")?.0 == n).then_some(())
            })
            .await;
        }
    };
    set_gpus("2").await;
    // The agent holds its GPUs for 2 s, so that two such jobs would overlap if both were let in.
    let gpu_job = |name: &str, gpus: i32| {
        job(
            name,
            json!({"resources": {"cpu": "100m", "memory": "48Mi", "gpu": gpus},
                         "agents": {"primary": {"command": ["/bin/sh", "-c", "sleep 2; exec /agent"]}}}),
        )
    };
    let too_big = create_and_approve(env, &gpu_job("gpu-3", 3)).await;
    let a = create_and_approve(env, &gpu_job("gpu-2a", 2)).await;
    let b = create_and_approve(env, &gpu_job("gpu-2b", 2)).await;
    for name in ["gpu-2a", "gpu-2b"] {
        wait_job(env, name, &format!("{name} Succeeded"), |j| {
            assert_ne!(phase(j), Some("Failed"), "{name} failed: {:#?}", j.status);
            phase(j) == Some("Succeeded")
        })
        .await;
    }
    let interval = |pods: Vec<Pod>| {
        let t =
            pods[0].status.as_ref().unwrap().container_statuses.as_ref().unwrap()[0].state.as_ref().unwrap().terminated.clone().unwrap();
        let limits = pods[0].spec.as_ref().unwrap().containers[0].resources.as_ref().unwrap().limits.clone().unwrap();
        assert_eq!(limits["nvidia.com/gpu"].0, "2");
        (t.started_at.unwrap().0, t.finished_at.unwrap().0)
    };
    let (a_start, a_end) = interval(job_pods(&env.admin, NS, &a).await);
    let (b_start, b_end) = interval(job_pods(&env.admin, NS, &b).await);
    println!("gpu: gpu-2a ran {a_start} → {a_end}, gpu-2b ran {b_start} → {b_end}");
    assert!(b_start >= a_end || a_start >= b_end, "two 2-GPU agents ran at once on a 2-GPU node");

    // The 3-GPU job is still waiting, with no Pod, and says why.
    let waiting = Api::<AgentJob>::namespaced(env.admin.clone(), NS).get("gpu-3").await.unwrap();
    assert!(job_pods(&env.admin, NS, &waiting).await.is_empty(), "no Pod for a job that does not fit");
    let infra = condition(&waiting, "InfrastructureReady").expect("InfrastructureReady condition");
    println!("gpu-3 waits: {} {}: {}", infra.status, infra.reason, infra.message);
    assert_eq!((infra.status.as_str(), infra.reason.as_str()), ("False", "InsufficientResources"));
    set_gpus("3").await;
    wait_job(env, "gpu-3", "gpu-3 Succeeded once the node has 3 GPUs", |j| phase(j) == Some("Succeeded")).await;
    let _ = too_big;
    set_gpus("0").await;
}

/// Throughput figure: 10 pre-approved jobs created together, until all Succeeded.
async fn jobs_per_second(env: &Env) {
    const N: usize = 10;
    let started = Instant::now();
    let mut jobs = Vec::new();
    for i in 0..N {
        jobs.push(create_and_approve(env, &job(&format!("burst-{i}"), json!({"resources": {"cpu": "50m", "memory": "32Mi"}}))).await);
    }
    let api: Api<AgentJob> = Api::namespaced(env.admin.clone(), NS);
    wait("the burst Succeeded", || async {
        let list = api.list(&ListParams::default()).await.expect("list jobs");
        let burst: Vec<_> = list.items.iter().filter(|j| j.name_any().starts_with("burst-")).collect();
        for j in &burst {
            assert_ne!(phase(j), Some("Failed"), "{} failed: {:#?}", j.name_any(), j.status);
        }
        (burst.iter().filter(|j| phase(j) == Some("Succeeded")).count() == N).then_some(())
    })
    .await;
    let elapsed = started.elapsed();
    println!("figure: {N} jobs (create + 2 votes each) → all Succeeded in {elapsed:.2?} = {:.2} jobs/s", N as f64 / elapsed.as_secs_f64());
}
