//! Playing the parts of a cluster that do not run here: nodes, the kubelet finishing agent Pods,
//! and category heads casting votes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agentgate::api::{AgentJob, ApprovalVote, ApprovalVoteSpec, Decision, JobRef};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::controlplane::{ControlPlane, OperatorProcess};

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

pub fn condition<'a>(job: &'a AgentJob, type_: &str) -> Option<&'a agentgate::api::Condition> {
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

/// Makes the ServiceAccounts `accounts` of `ns` voters and heads of every category there, as a
/// head who may create RoleBindings can (RoleBindings `<prefix>-vote` and `<prefix>-head` to
/// [`grant_voting_rights`]'s ClusterRoles). Idempotent.
pub async fn bind_service_accounts_as_heads(admin: &Client, ns: &str, prefix: &str, accounts: &[impl AsRef<str>]) {
    use k8s_openapi::api::rbac::v1::RoleBinding;
    let pp = PatchParams::apply("agentgate-test-rbac").force();
    let subjects: Vec<serde_json::Value> =
        accounts.iter().map(|a| json!({"kind": "ServiceAccount", "name": a.as_ref(), "namespace": ns})).collect();
    for (suffix, role) in [("vote", "test-agentgate-voter"), ("head", "test-agentgate-head-of-every-category")] {
        let name = format!("{prefix}-{suffix}");
        let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name, "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role}, "subjects": subjects});
        Api::<RoleBinding>::namespaced(admin.clone(), ns).patch(&name, &pp, &Patch::Apply(&binding)).await.expect("apply RoleBinding");
    }
}

/// Lets `user` write AgentJob status in `ns` (and nothing else of agentgate's), as a tenant with
/// status RBAC may: the attacker of the tests that forge a job's status. Idempotent.
pub async fn grant_status_writing(admin: &Client, ns: &str, user: &str) {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let pp = PatchParams::apply("agentgate-test-rbac").force();
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "status-writer", "namespace": ns},
        "rules": [{"apiGroups": ["agentgate.dev"], "resources": ["agentjobs/status"], "verbs": ["get", "update", "patch"]}]});
    Api::<Role>::namespaced(admin.clone(), ns).patch("status-writer", &pp, &Patch::Apply(&role)).await.expect("apply Role");
    let name = format!("{user}-writes-status");
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name, "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "status-writer"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]});
    Api::<RoleBinding>::namespaced(admin.clone(), ns).patch(&name, &pp, &Patch::Apply(&binding)).await.expect("apply RoleBinding");
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

/// An AgentJob manifest built from a small valid one: category `core-security`, one agent
/// `scanner` (`ghcr.io/acme/scanner:2.1` on `gpt-4o-mini`), 500m CPU and 1Gi, a $5.00 budget.
/// Each setter replaces its part; [`Self::spec`] merges anything else in.
pub struct JobManifest {
    name: String,
    namespace: Option<String>,
    spec: serde_json::Value,
}

impl JobManifest {
    pub fn new(name: &str) -> Self {
        JobManifest {
            name: name.into(),
            namespace: None,
            spec: json!({"category": "core-security",
                         "agents": {"primary": {"name": "scanner", "image": "ghcr.io/acme/scanner:2.1", "model": "gpt-4o-mini"}},
                         "resources": {"cpu": "500m", "memory": "1Gi"}, "budget": {"maxCostUSD": "5.00"}}),
        }
    }

    /// A one-agent job of category `payments`: agent `agent` (`ghcr.io/acme/agent:1` on
    /// `gpt-4o-mini`), 100m CPU and 128Mi, a $5 budget.
    pub fn payments(name: &str) -> Self {
        Self::new(name).category("payments").primary("agent", "ghcr.io/acme/agent:1", "gpt-4o-mini").resources("100m", "128Mi").budget("5")
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    pub fn job_type(self, job_type: &str) -> Self {
        self.spec(json!({"jobType": job_type}))
    }

    pub fn category(self, category: &str) -> Self {
        self.spec(json!({"category": category}))
    }

    /// The primary agent (replacing the default one).
    pub fn primary(mut self, name: &str, image: &str, model: &str) -> Self {
        self.spec["agents"]["primary"] = json!({"name": name, "image": image, "model": model});
        self
    }

    pub fn resources(self, cpu: &str, memory: &str) -> Self {
        self.spec(json!({"resources": {"cpu": cpu, "memory": memory}}))
    }

    /// `budget.maxCostUSD`.
    pub fn budget(self, max_cost_usd: &str) -> Self {
        self.spec(json!({"budget": {"maxCostUSD": max_cost_usd}}))
    }

    /// Merges `patch` into the spec (objects key by key; anything else replaces).
    pub fn spec(mut self, patch: serde_json::Value) -> Self {
        merge(&mut self.spec, patch);
        self
    }

    pub fn build(self) -> AgentJob {
        let mut job = agent_job(&self.name, self.spec, json!({}));
        job.metadata.namespace = self.namespace;
        job
    }
}

/// A one-agent job of category `payments` (agent `agent`, so its first Pod is `<name>-agent-1`),
/// created by `author`'s client: the admission policy stamps them as its requester.
/// A client of `user` (one of the control plane's users) that acts as `as_user`, as
/// `kubectl --as` does: the apiserver checks that `user` may impersonate them.
pub async fn impersonating(user: &str, as_user: &str) -> Client {
    let path = ControlPlane::shared().kubeconfig(user);
    let mut kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("read kubeconfig");
    for named in &mut kubeconfig.auth_infos {
        if let Some(auth) = named.auth_info.as_mut() {
            auth.impersonate = Some(as_user.into());
        }
    }
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await.expect("config");
    Client::try_from(config).expect("client")
}

pub async fn create_payments_job(author: &Client, namespace: &str, name: &str) -> AgentJob {
    let job = JobManifest::payments(name).build();
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

/// A test's cluster: the binary's shared control plane, its namespace(s), optionally a node and
/// the voting RBAC, and the operator under test. The one way a test file gets these; what differs
/// between files (node size, operator flags, one operator per test or per binary) is an option of
/// [`EnvBuilder`].
pub struct Env {
    pub cp: &'static ControlPlane,
    /// The first namespace given to [`Env::builder`].
    pub ns: String,
    pub admin: Client,
    pub alice: Client,
    pub bob: Client,
    /// This test's own operator: started by [`EnvBuilder::build`] ([`OperatorMode::PerTest`]) or
    /// by [`Env::start_operator`]; none under [`OperatorMode::Shared`].
    pub operator: Option<OperatorProcess>,
    operator_args: Vec<String>,
}

/// Which operator a test gets.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OperatorMode {
    /// One per test, started by [`EnvBuilder::build`] (the default).
    PerTest,
    /// One per test binary, watching every namespace, started by the first test that asks; every
    /// test of the binary must give the same flags.
    Shared,
    /// None yet: the test starts it ([`Env::start_operator`]) or its own replicas
    /// ([`Env::operator_args`]) once its preparations are in place.
    Later,
}

/// What [`add_node`] registers.
struct NodeSpec {
    name: String,
    cpu: String,
    memory: String,
    extended: Vec<(String, String)>,
}

pub struct EnvBuilder {
    namespaces: Vec<String>,
    namespace_labels: Vec<(String, String)>,
    restricted: bool,
    node: Option<NodeSpec>,
    voting_rights: bool,
    mode: OperatorMode,
    watch_one_namespace: bool,
    metrics_addr: String,
    extra_args: Vec<String>,
    audit_log: bool,
}

impl Env {
    /// An environment around namespace `ns`: voting RBAC granted, no node, a per-test operator
    /// watching `ns` with its metrics on a free port.
    pub fn builder(ns: &str) -> EnvBuilder {
        EnvBuilder {
            namespaces: vec![ns.to_string()],
            namespace_labels: Vec::new(),
            restricted: false,
            node: None,
            voting_rights: true,
            mode: OperatorMode::PerTest,
            watch_one_namespace: true,
            metrics_addr: "127.0.0.1:0".into(),
            extra_args: Vec::new(),
            audit_log: false,
        }
    }

    /// A client for one of the control plane's users.
    pub async fn user(&self, name: &str) -> Client {
        self.cp.client(name).await
    }

    /// The operator's command-line arguments (after `run`), to start replicas of it.
    pub fn operator_args(&self) -> Vec<&str> {
        self.operator_args.iter().map(String::as_str).collect()
    }

    /// Starts the operator with [`Self::operator_args`], replacing (and killing) a running one.
    pub fn start_operator(&mut self) -> &mut OperatorProcess {
        self.operator = None;
        self.operator.insert(OperatorProcess::start(self.cp, &self.operator_args()))
    }

    /// SIGKILLs this test's operator (no graceful shutdown); [`Self::start_operator`] starts the next.
    pub fn kill_operator(&mut self) {
        self.operator.as_mut().expect("this test's operator").kill();
    }

    /// The operator serving this test: its own, or the binary's shared one.
    pub fn operator(&self) -> &OperatorProcess {
        match &self.operator {
            Some(operator) => operator,
            None => shared_operator(),
        }
    }
}

/// The operator [`OperatorMode::Shared`] started for this test binary.
pub fn shared_operator() -> &'static OperatorProcess {
    &SHARED_OPERATOR.get().expect("no shared operator started in this test binary").1
}

static SHARED_OPERATOR: std::sync::OnceLock<(Vec<String>, OperatorProcess)> = std::sync::OnceLock::new();

impl EnvBuilder {
    /// More namespaces, created alongside the first.
    pub fn namespaces(mut self, more: &[&str]) -> Self {
        self.namespaces.extend(more.iter().map(|ns| ns.to_string()));
        self
    }

    /// Labels every namespace of the environment carries before the operator starts.
    pub fn namespace_labels(mut self, labels: &[(&str, &str)]) -> Self {
        self.namespace_labels.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// Pod Security admission enforces the restricted standard in every namespace ([`enforce_restricted`]).
    pub fn pod_security_restricted(mut self) -> Self {
        self.restricted = true;
        self
    }

    /// A Ready node with this allocatable capacity ([`add_node`]).
    pub fn node(mut self, name: &str, cpu: &str, memory: &str, extended: &[(&str, &str)]) -> Self {
        let extended = extended.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.node = Some(NodeSpec { name: name.into(), cpu: cpu.into(), memory: memory.into(), extended });
        self
    }

    /// On the control plane that writes an audit log ([`ControlPlane::shared_with_audit_log`]):
    /// every test of the binary must ask for it, or the binary runs two control planes.
    pub fn audit_log(mut self) -> Self {
        self.audit_log = true;
        self
    }

    /// Leaves out [`grant_voting_rights`].
    pub fn without_voting_rights(mut self) -> Self {
        self.voting_rights = false;
        self
    }

    pub fn operator(mut self, mode: OperatorMode) -> Self {
        self.mode = mode;
        self
    }

    /// The operator watches every namespace (no `--namespace`); always so for
    /// [`OperatorMode::Shared`].
    pub fn all_namespaces(mut self) -> Self {
        self.watch_one_namespace = false;
        self
    }

    /// `--metrics-addr` (default `127.0.0.1:0`).
    pub fn metrics_addr(mut self, addr: &str) -> Self {
        self.metrics_addr = addr.into();
        self
    }

    /// More operator flags, after `--namespace` and `--metrics-addr`.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Creates the namespaces, the node and the RBAC, then starts the operator as asked.
    pub async fn build(self) -> Env {
        let cp = if self.audit_log { ControlPlane::shared_with_audit_log() } else { ControlPlane::shared() };
        for ns in &self.namespaces {
            cp.namespace(ns).await;
        }
        let admin = cp.client("admin").await;
        if !self.namespace_labels.is_empty() {
            let labels: BTreeMap<&str, &str> = self.namespace_labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            for ns in &self.namespaces {
                Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone())
                    .patch(ns, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": labels}})))
                    .await
                    .expect("label namespace");
            }
        }
        if self.restricted {
            for ns in &self.namespaces {
                enforce_restricted(&admin, ns).await;
            }
        }
        if let Some(node) = &self.node {
            let extended: Vec<(&str, &str)> = node.extended.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            add_node(&admin, &node.name, &node.cpu, &node.memory, &extended).await;
        }
        if self.voting_rights {
            grant_voting_rights(&admin).await;
        }
        let ns = self.namespaces[0].clone();
        let mut operator_args = Vec::new();
        if self.watch_one_namespace && self.mode != OperatorMode::Shared {
            operator_args.extend(["--namespace".to_string(), ns.clone()]);
        }
        operator_args.extend(["--metrics-addr".to_string(), self.metrics_addr]);
        operator_args.extend(self.extra_args);
        let mut env = Env { cp, ns, alice: cp.client("alice").await, bob: cp.client("bob").await, admin, operator: None, operator_args };
        match self.mode {
            OperatorMode::PerTest => {
                env.start_operator();
            }
            OperatorMode::Shared => {
                let (args, _) = SHARED_OPERATOR.get_or_init(|| {
                    let operator = OperatorProcess::start(cp, &env.operator_args());
                    (env.operator_args.clone(), operator)
                });
                assert_eq!(args, &env.operator_args, "every test of a binary gives the shared operator the same flags");
            }
            OperatorMode::Later => {}
        }
        env
    }
}

/// A token from the apiserver's TokenRequest API for the namespace's `default` ServiceAccount,
/// bound to `pod` when given.
pub async fn service_account_token(admin: &Client, ns: &str, pod: Option<&Pod>, audience: &str) -> String {
    let bound = pod.map(|p| json!({"apiVersion": "v1", "kind": "Pod", "name": p.name_any(), "uid": p.metadata.uid.clone()}));
    let request: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [audience], "boundObjectRef": bound, "expirationSeconds": 3600}}))
        .unwrap();
    let answer = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(admin.clone(), ns)
        .create_token_request("default", &PostParams::default(), &request)
        .await
        .unwrap();
    answer.status.and_then(|s| s.token).expect("a token")
}
