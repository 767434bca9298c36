//! Playing the parts of a cluster that do not run here: nodes, the kubelet finishing agent Pods,
//! and category heads casting votes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agentgate::api::{AgentJob, ApprovalVote, ApprovalVoteSpec, Decision, JobRef};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// Registers a Ready node with the given allocatable resources (and makes it Ready).
pub async fn add_node(client: &Client, name: &str, cpu: &str, memory: &str, extended: &[(&str, &str)]) {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})).unwrap();
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating node {name}: {e}"),
    }
    let mut allocatable: BTreeMap<String, String> =
        BTreeMap::from([("cpu".into(), cpu.into()), ("memory".into(), memory.into()), ("pods".into(), "110".into())]);
    for (k, v) in extended {
        allocatable.insert(k.to_string(), v.to_string());
    }
    let status = json!({"status": {
        "capacity": allocatable, "allocatable": allocatable,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "played by the test",
                        "lastHeartbeatTime": now(), "lastTransitionTime": now()}]}});
    nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await.expect("node status");
    // The TaintNodesByCondition admission plugin taints every new node not-ready; the node
    // lifecycle controller, which is not running here, would lift it once the node is Ready.
    nodes.patch(name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"taints": null}}))).await.expect("untaint node");
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The kubelet's part: the Pod is Running.
pub async fn run_pod(client: &Client, namespace: &str, pod: &str) {
    try_run_pod(client, namespace, pod).await.expect("pod running");
}

/// [`run_pod`] returning the error, for tests that write through API outages.
pub async fn try_run_pod(client: &Client, namespace: &str, pod: &str) -> Result<Pod, kube::Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let status = json!({"status": {"phase": "Running", "startTime": now(),
        "containerStatuses": [{"name": "agent", "image": "agent", "imageID": "", "ready": true, "restartCount": 0,
                               "state": {"running": {"startedAt": now()}}}]}});
    api.patch_status(pod, &PatchParams::default(), &Patch::Merge(&status)).await
}

/// The kubelet's part: the agent container exited with `exit_code` and wrote `message` to its
/// termination log.
pub async fn finish_pod(client: &Client, namespace: &str, pod: &str, exit_code: i32, message: &str) {
    try_finish_pod(client, namespace, pod, exit_code, message).await.expect("pod terminated");
}

/// [`finish_pod`] returning the error, for tests that write through API outages.
pub async fn try_finish_pod(client: &Client, namespace: &str, pod: &str, exit_code: i32, message: &str) -> Result<Pod, kube::Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let phase = if exit_code == 0 { "Succeeded" } else { "Failed" };
    let reason = if exit_code == 0 { "Completed" } else { "Error" };
    let status = json!({"status": {"phase": phase,
        "containerStatuses": [{"name": "agent", "image": "agent", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": exit_code, "reason": reason, "message": message,
                                     "startedAt": now(), "finishedAt": now()}}}]}});
    api.patch_status(pod, &PatchParams::default(), &Patch::Merge(&status)).await
}

/// A usage report as an agent writes it to /dev/termination-log.
pub fn usage_report(model: &str, input: i64, cached: i64, output: i64, result: serde_json::Value) -> String {
    json!({"usage": [{"model": model, "inputTokens": input, "cachedInputTokens": cached, "outputTokens": output}], "output": result})
        .to_string()
}

/// Casts a vote on the job's current generation, as `client`'s user would.
pub async fn vote(client: &Client, job: &AgentJob, voter: &str, decision: Decision) -> ApprovalVote {
    vote_on_generation(client, job, voter, decision, job.metadata.generation.unwrap_or(1)).await
}

pub async fn vote_on_generation(client: &Client, job: &AgentJob, voter: &str, decision: Decision, generation: i64) -> ApprovalVote {
    let namespace = job.namespace().unwrap();
    let api: Api<ApprovalVote> = Api::namespaced(client.clone(), &namespace);
    let name =
        format!("{}-{voter}-g{generation}-{}", job.name_any(), api.list(&ListParams::default()).await.map(|l| l.items.len()).unwrap_or(0));
    let vote = ApprovalVote::new(
        &name,
        ApprovalVoteSpec {
            job_ref: JobRef { name: job.name_any(), uid: job.metadata.uid.clone().unwrap(), generation },
            voter: voter.into(),
            decision,
            reason: Some(format!("{voter} looked at it")),
            voter_groups: Vec::new(),
            confidence: Some(90),
        },
    );
    api.create(&PostParams::default(), &vote).await.unwrap_or_else(|e| panic!("creating vote {name}: {e}"))
}

/// Polls `get` until `done` holds, or panics after `timeout` showing the last value.
pub async fn wait_for<T: std::fmt::Debug, F, Fut>(what: &str, timeout: Duration, mut get: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let start = Instant::now();
    loop {
        let value = get().await;
        if done(&value) {
            return value;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}; last value: {value:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls every `every` until `get` yields, or panics after `timeout` naming `what`.
pub async fn wait_some<T, F, Fut>(what: &str, timeout: Duration, every: Duration, mut get: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = get().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(every).await;
    }
}

/// Waits until the job's status satisfies `done`.
pub async fn wait_for_job(client: &Client, namespace: &str, name: &str, what: &str, done: impl Fn(&AgentJob) -> bool) -> AgentJob {
    let api: Api<AgentJob> = Api::namespaced(client.clone(), namespace);
    wait_for(what, Duration::from_secs(30), || async { api.get(name).await.expect("get job") }, done).await
}

pub fn phase(job: &AgentJob) -> Option<&'static str> {
    job.status.as_ref().and_then(|s| s.phase).map(|p| p.as_str())
}

pub fn condition<'a>(job: &'a AgentJob, type_: &str) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    job.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

/// Agent Pods of a job, sorted by name.
pub async fn job_pods(client: &Client, namespace: &str, job: &AgentJob) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = format!("agentgate.dev/job-uid={}", job.metadata.uid.as_deref().unwrap());
    let mut pods = api.list(&ListParams::default().labels(&selector)).await.expect("list pods").items;
    pods.sort_by_key(|p| p.name_any());
    pods
}

/// RBAC the tests and the demo rely on: every user in `agentgate:users` may read jobs and cast
/// votes; `agentgate:heads` (alice and bob) are heads of every category. Idempotent.
pub async fn grant_voting_rights(admin: &Client) {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let pp = PatchParams::apply("agentgate-test-rbac").force();
    let roles = [
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "test-agentgate-voter"},
               "rules": [{"apiGroups": ["agentgate.dev"], "resources": ["approvalvotes"], "verbs": ["create", "get", "list", "watch", "delete"]},
                         {"apiGroups": ["agentgate.dev"], "resources": ["agentjobs"], "verbs": ["create", "get", "list", "watch", "patch", "update"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "test-agentgate-head-of-every-category"},
               "rules": [{"apiGroups": ["agentgate.dev"], "resources": ["categories"], "verbs": ["approve"]}]}),
    ];
    for role in roles {
        let name = role["metadata"]["name"].as_str().unwrap().to_string();
        Api::<ClusterRole>::all(admin.clone()).patch(&name, &pp, &Patch::Apply(&role)).await.expect("apply ClusterRole");
    }
    let bindings = [
        ("test-agentgate-voters", "test-agentgate-voter", "agentgate:users"),
        ("test-agentgate-heads", "test-agentgate-head-of-every-category", "agentgate:heads"),
    ];
    for (name, role, group) in bindings {
        let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}]});
        Api::<ClusterRoleBinding>::all(admin.clone()).patch(name, &pp, &Patch::Apply(&binding)).await.expect("apply ClusterRoleBinding");
    }
}

/// An AgentJob named `name` whose spec is `base` with `patch` merged into it (objects merge key
/// by key; anything else replaces).
pub fn agent_job(name: &str, mut base: serde_json::Value, patch: serde_json::Value) -> AgentJob {
    merge(&mut base, patch);
    serde_json::from_value(json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob", "metadata": {"name": name}, "spec": base}))
        .expect("a valid AgentJob")
}

fn merge(base: &mut serde_json::Value, patch: serde_json::Value) {
    match (base, patch) {
        (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}

/// A one-agent job of category `payments` (agent `agent`, so its first Pod is `<name>-agent-1`),
/// created by `author`'s client: the admission policy stamps them as its requester.
pub async fn create_payments_job(author: &Client, namespace: &str, name: &str) -> AgentJob {
    let job = agent_job(
        name,
        json!({"category": "payments",
               "agents": {"primary": {"name": "agent", "image": "ghcr.io/acme/agent:1", "model": "gpt-4o-mini"}},
               "resources": {"cpu": "100m", "memory": "128Mi"}, "budget": {"maxCostUSD": "5"}}),
        json!({}),
    );
    Api::<AgentJob>::namespaced(author.clone(), namespace).create(&PostParams::default(), &job).await.expect("create job")
}

/// Labels `namespace` so Pod Security admission enforces the restricted standard (latest) there.
pub async fn enforce_restricted(admin: &Client, namespace: &str) {
    let labels = serde_json::json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted",
                                                            "pod-security.kubernetes.io/enforce-version": "latest"}}});
    kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone())
        .patch(namespace, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(labels))
        .await
        .expect("label the namespace restricted");
}
