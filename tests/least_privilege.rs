//! Least privilege, checked against what the operator really does.
//!
//! The operator runs as the ServiceAccount of `deploy/`, bound to exactly the Roles and
//! ClusterRoles found there (by kind, across `deploy/*.yaml`), on an apiserver that writes an
//! audit log. A lifecycle touching every feature runs: discovery of a labelled Service (and its
//! removal), a tool with a credentials Secret, a job with tools, a Secret-backed env var and
//! input, votes, Pods in a namespace enforcing the restricted Pod Security Standard (one of them
//! deleted under a running attempt), a usage report, the estimator's ConfigMap, leader election,
//! Events. Then, from the audit log:
//! - no request of the operator was refused (403);
//! - every right granted was used, except the few listed in [`RARELY_USED`] with the reason;
//! - the chart's rules are the same as deploy/'s, and neither has a wildcard.
//!
//! Also here: a Secret value planted in the Secrets a tool and a job reference appears nowhere
//! the operator writes or says anything (its log, Events, every agentgate object, its
//! ConfigMap, the Pods it creates).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::time::Duration;

use agentgate::api::{AgentJob, AgentTool, ApprovalVote, Decision};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::cluster::*;
use support::controlplane::{ControlPlane, OperatorProcess};

const SYSTEM: &str = "agentgate-system";
const OPERATOR_USER: &str = "system:serviceaccount:agentgate-system:agentgate";
const JOBS: &str = "lp-jobs";
const TOOLS: &str = "lp-tools";
const DISCOVERY: &str = "lp-discovery";
const TIMEOUT: Duration = Duration::from_secs(45);

/// Rights the lifecycle does not exercise, and why they are granted anyway. Keyed by
/// (verb, apiGroup, resource[/subresource]).
const RARELY_USED: &[(&str, &str, &str, &str)] = &[
    (
        "update",
        "agentgate.dev",
        "agentjobs/finalizers",
        "never a request: the OwnerReferencesPermissionEnforcement admission plugin (off in this test apiserver) checks it when \
         the operator creates a Pod whose ownerReference has blockOwnerDeletion",
    ),
    (
        "get",
        "apps",
        "controllerrevisions",
        "only when a job's generation falls out of its status.history (the 11th generation) and controller/spec_history.rs \
         prunes that generation's revision",
    ),
    ("delete", "apps", "controllerrevisions", "the same pruning, right after that get"),
    ("patch", "events.k8s.io", "events", "only when the same Event repeats and controller/events.rs updates its series count"),
    (
        "update",
        "",
        "secrets",
        "only when the meter API's certificate is renewed, 30 days before it expires or when its names change \
         (controller/meter_tls.rs; tests/meter_grants.rs renews it)",
    ),
    (
        "delete",
        "",
        "pods",
        "only when a job is deleted while one of its Pods still runs: an orphaning delete would leave it running with no job \
         (controller/lost_pods.rs; tests/usage_durability.rs deletes one so)",
    ),
    (
        "create",
        "agentgate.dev",
        "agentjobs/pods",
        "never a request: the ValidatingAdmissionPolicy of deploy/admission/pods.yaml asks the authorizer for it when the \
         operator creates an agent Pod",
    ),
];

/// Every document in `deploy/*.yaml` (not its subdirectories) of the given kinds.
fn deploy_objects(kinds: &[&str]) -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut files: Vec<_> =
        fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "yaml")).collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| yaml_documents(&fs::read_to_string(f).unwrap()))
        .filter(|o| kinds.contains(&o["kind"].as_str().unwrap_or("")))
        .collect()
}

fn yaml_documents(text: &str) -> Vec<Value> {
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            if let Ok(value) = serde_saphyr::from_str::<Value>(&current)
                && value.is_object()
            {
                docs.push(value);
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs
}

/// A right: (verb, apiGroup, resource[/subresource]) in a namespace (None: cluster-wide).
type Right = (String, String, String);

fn rights_of(rules: &Value) -> BTreeSet<Right> {
    let mut rights = BTreeSet::new();
    for rule in rules.as_array().into_iter().flatten() {
        let list =
            |key: &str| -> Vec<String> { rule[key].as_array().into_iter().flatten().map(|v| v.as_str().unwrap().to_string()).collect() };
        for group in list("apiGroups") {
            for resource in list("resources") {
                for verb in list("verbs") {
                    rights.insert((verb.clone(), group.clone(), resource.clone()));
                }
            }
        }
    }
    rights
}

fn has_wildcard(rules: &Value) -> bool {
    rules.as_array().into_iter().flatten().any(|rule| {
        ["apiGroups", "resources", "verbs", "resourceNames"]
            .iter()
            .any(|key| rule[*key].as_array().into_iter().flatten().any(|v| v.as_str().is_some_and(|s| s.contains('*'))))
    })
}

#[test]
fn chart_rules_are_the_rules_of_deploy_and_have_no_wildcards() {
    let deploy = deploy_objects(&["ClusterRole", "Role"]);
    assert!(!deploy.is_empty(), "no ClusterRole or Role in deploy/");
    let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/agentgate/templates");
    let mut chart = Vec::new();
    for file in ["clusterrole.yaml", "clusterrole-templates.yaml", "role-leader-election.yaml", "role-meter-api-tls.yaml"] {
        // With the chart's default values every conditional rule is rendered; template lines
        // only name things.
        let text: String =
            fs::read_to_string(templates.join(file)).unwrap().lines().filter(|l| !l.contains("{{")).map(|l| format!("{l}\n")).collect();
        chart.extend(yaml_documents(&text).into_iter().filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role"));
    }
    for object in deploy.iter().chain(&chart) {
        assert!(!has_wildcard(&object["rules"]), "wildcard in {} {}", object["kind"], object["metadata"]["name"]);
    }
    for kind in ["ClusterRole", "Role"] {
        let of = |objects: &[Value]| -> BTreeSet<Right> {
            objects.iter().filter(|o| o["kind"] == kind).flat_map(|o| rights_of(&o["rules"])).collect()
        };
        assert_eq!(of(&chart), of(&deploy), "{kind} rules of the chart and of deploy/ differ");
    }
}

/// One request of the operator, from the audit log.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Request {
    verb: String,
    group: String,
    resource: String,
    namespace: Option<String>,
    code: i64,
    uri: String,
}

fn operator_requests(audit_log: &Path) -> Vec<Request> {
    let text = fs::read_to_string(audit_log).expect("reading the audit log");
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        // A watch is logged when it starts (ResponseStarted) and again when it ends.
        .filter(|e| e["user"]["username"] == OPERATOR_USER && (e["stage"] == "ResponseComplete" || e["stage"] == "ResponseStarted"))
        .map(|e| {
            let r = &e["objectRef"];
            let resource = match r["subresource"].as_str() {
                Some(sub) => format!("{}/{sub}", r["resource"].as_str().unwrap_or_default()),
                None => r["resource"].as_str().unwrap_or_default().to_string(),
            };
            Request {
                verb: e["verb"].as_str().unwrap_or_default().to_string(),
                group: r["apiGroup"].as_str().unwrap_or_default().to_string(),
                resource,
                namespace: r["namespace"].as_str().map(str::to_string),
                code: e["responseStatus"]["code"].as_i64().unwrap_or_default(),
                uri: e["requestURI"].as_str().unwrap_or_default().to_string(),
            }
        })
        .collect()
}

/// Whether a server-side apply that creates an object needs `create` as well as `patch`: asked
/// of this apiserver with a ServiceAccount that may only `patch` ConfigMaps.
async fn apply_that_creates_needs_create(cp: &ControlPlane, admin: &Client) -> bool {
    let pp = PatchParams::apply("least-privilege-test").force();
    let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "patch-only", "namespace": SYSTEM}});
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "patch-only", "namespace": SYSTEM},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["patch"]}]});
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "patch-only", "namespace": SYSTEM},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "patch-only"},
        "subjects": [{"kind": "ServiceAccount", "name": "patch-only", "namespace": SYSTEM}]});
    for object in [sa, role, binding] {
        apply(admin, &object, &pp).await;
    }
    let token = service_account_token(cp, "patch-only");
    let client = client_for(&cp.token_kubeconfig("patch-only", &token, SYSTEM)).await;
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "created-by-apply"}, "data": {"a": "b"}});
    let result = Api::<ConfigMap>::namespaced(client, SYSTEM).patch("created-by-apply", &pp, &Patch::Apply(&cm)).await;
    match result {
        Ok(_) => false,
        Err(kube::Error::Api(s)) if s.code == 403 => true,
        Err(e) => panic!("probing apply-creates: {e}"),
    }
}

async fn apply(admin: &Client, object: &Value, pp: &PatchParams) {
    let api_version = object["apiVersion"].as_str().unwrap();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let kind = object["kind"].as_str().unwrap();
    let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
    let (resource, caps) = kube::discovery::pinned_kind(admin, &gvk).await.expect("discovering the kind");
    let name = object["metadata"]["name"].as_str().unwrap();
    let api: Api<DynamicObject> = match (caps.scope, object["metadata"]["namespace"].as_str()) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => Api::namespaced_with(admin.clone(), ns, &resource),
        _ => Api::all_with(admin.clone(), &resource),
    };
    api.patch(name, pp, &Patch::Apply(object)).await.unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
}

fn service_account_token(cp: &ControlPlane, name: &str) -> String {
    let out = cp.kubectl("admin", &["create", "token", name, "-n", SYSTEM, "--duration=2h"]);
    assert!(out.status.success(), "kubectl create token: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

async fn client_for(kubeconfig: &Path) -> Client {
    let config = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default()).await.unwrap();
    Client::try_from(config).unwrap()
}

async fn labelled_namespace(cp: &ControlPlane, admin: &Client, name: &str, labels: Value) {
    cp.namespace(name).await;
    Api::<Namespace>::all(admin.clone())
        .patch(name, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": labels}})))
        .await
        .expect("labelling a namespace");
}

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("a valid object")
}

/// The world the operator works on, created as admin; the planted value is in two Secrets.
async fn build_world(admin: &Client, planted: &str) {
    add_node(admin, "lp-node", "64", "256Gi", &[]).await;
    grant_voting_rights(admin).await;
    let secret = |ns: &str, name: &str, key: &str| -> Secret {
        from_json(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns}, "stringData": {key: planted}}))
    };
    Api::<Secret>::namespaced(admin.clone(), TOOLS)
        .create(&PostParams::default(), &secret(TOOLS, "scanner-credentials", "token"))
        .await
        .unwrap();
    Api::<Secret>::namespaced(admin.clone(), JOBS).create(&PostParams::default(), &secret(JOBS, "agent-token", "token")).await.unwrap();
    let service: Service = from_json(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "lp-bandit", "namespace": TOOLS, "labels": {"agentgate.dev/tool": "lp-bandit"},
                     "annotations": {"agentgate.dev/rate-limit": "60", "agentgate.dev/port": "8080"}},
        "spec": {"selector": {"app": "bandit"}, "ports": [{"name": "http", "port": 8080}]}}));
    Api::<Service>::namespaced(admin.clone(), TOOLS).create(&PostParams::default(), &service).await.unwrap();
    let slice: EndpointSlice = from_json(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "lp-bandit-abcde", "namespace": TOOLS, "labels": {"kubernetes.io/service-name": "lp-bandit"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}));
    Api::<EndpointSlice>::namespaced(admin.clone(), TOOLS).create(&PostParams::default(), &slice).await.unwrap();
    let tool: AgentTool =
        from_json(json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentTool", "metadata": {"name": "lp-scanner"},
        "spec": {"type": "api", "endpoint": {"url": "https://scanner.tools.example/v1"}, "rateLimit": 100,
                 "credentials": {"secretRef": {"namespace": TOOLS, "name": "scanner-credentials", "key": "token"}}}}));
    Api::<AgentTool>::all(admin.clone()).create(&PostParams::default(), &tool).await.unwrap();
    let quota = json!({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "lp-quota", "namespace": JOBS},
        "spec": {"hard": {"requests.cpu": "32", "requests.memory": "64Gi"}}});
    apply(admin, &quota, &PatchParams::apply("least-privilege-test")).await;
}

async fn tool_ready(admin: &Client, name: &str) -> AgentTool {
    let tools = Api::<AgentTool>::all(admin.clone());
    wait_for(
        &format!("tool {name} Ready"),
        TIMEOUT,
        || async { tools.get_opt(name).await.unwrap() },
        |t: &Option<AgentTool>| t.as_ref().and_then(|t| t.status.as_ref()).is_some_and(|s| s.ready),
    )
    .await
    .unwrap()
}

/// Runs one job through every gate to Succeeded, playing the kubelet.
async fn run_job(admin: &Client, meter_api_port: u16) -> AgentJob {
    let job = agent_job(
        "lp-scan",
        json!({"category": "core-security",
               "agents": {"primary": {"name": "scanner", "image": "ghcr.io/acme/scanner:2.1", "model": "gpt-4o-mini",
                          "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "agent-token", "key": "token"}}}]}},
               "tools": [{"name": "lp-bandit", "minRateLimit": 10, "estimatedCalls": 5}, {"name": "lp-scanner", "estimatedCalls": 2}],
               "resources": {"cpu": "500m", "memory": "512Mi"}, "budget": {"maxCostUSD": "5.00"},
               "input": {"repositoryPath": "/src"},
               "inputSchema": {"type": "object", "required": ["repositoryPath"]}}),
        json!({}),
    );
    // The job names a Secret, so its author must be allowed to read it (deploy/admission/secrets.yaml).
    let pp = PatchParams::apply("least-privilege-test").force();
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "read-agent-token", "namespace": JOBS},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["agent-token"], "verbs": ["get"]}]});
    Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(admin.clone(), JOBS)
        .patch("read-agent-token", &pp, &Patch::Apply(&role))
        .await
        .unwrap();
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "dave-reads-agent-token", "namespace": JOBS},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-agent-token"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "dave"}]});
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), JOBS)
        .patch("dave-reads-agent-token", &pp, &Patch::Apply(&binding))
        .await
        .unwrap();
    let cp = ControlPlane::shared_with_audit_log();
    wait_for(
        "dave may get agent-token",
        TIMEOUT,
        || async { cp.kubectl("dave", &["auth", "can-i", "get", "secret/agent-token", "-n", JOBS]).stdout },
        |out: &Vec<u8>| String::from_utf8_lossy(out).trim() == "yes",
    )
    .await;
    let dave = ControlPlane::shared_with_audit_log().client("dave").await;
    let created = Api::<AgentJob>::namespaced(dave, JOBS).create(&PostParams::default(), &job).await.expect("dave creates a job");
    wait_for_job(admin, JOBS, "lp-scan", "awaiting approval", |j| phase(j) == Some("AwaitingApproval")).await;
    // dave is no head: his vote costs a SubjectAccessReview and does not count.
    vote(&ControlPlane::shared_with_audit_log().client("dave").await, &created, "dave", Decision::Approve).await;
    vote(&ControlPlane::shared_with_audit_log().client("alice").await, &created, "alice", Decision::Approve).await;
    vote(&ControlPlane::shared_with_audit_log().client("bob").await, &created, "bob", Decision::Approve).await;
    wait_for_job(admin, JOBS, "lp-scan", "running", |j| phase(j) == Some("Running")).await;
    let pods = wait_for("the agent Pod", TIMEOUT, || job_pods(admin, JOBS, &created), |p: &Vec<Pod>| p.len() == 1).await;
    let pod = pods[0].name_any();
    run_pod(admin, JOBS, &pod).await;
    meter_draws_and_reports(admin, &pods[0], meter_api_port).await;
    finish_pod(admin, JOBS, &pod, 0, &usage_report("gpt-4o-mini", 12_000, 0, 3_000, json!({"findings": 2}))).await;
    wait_for_job(admin, JOBS, "lp-scan", "succeeded", |j| phase(j) == Some("Succeeded")).await
}

/// The Pod's meter draws budget and reports the usage its agent then reports too, with a real
/// Pod-bound token: the meter API's TokenReview, Pod read and status write.
async fn meter_draws_and_reports(admin: &Client, pod: &Pod, port: u16) {
    use http_body_util::BodyExt;
    use k8s_openapi::api::authentication::v1::TokenRequest;
    let bound = json!({"apiVersion": "v1", "kind": "Pod", "name": pod.name_any(), "uid": pod.metadata.uid.clone()});
    let request: TokenRequest = serde_json::from_value(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": ["agentgate.dev/meter"], "boundObjectRef": bound, "expirationSeconds": 3600}}))
    .unwrap();
    let token = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(admin.clone(), JOBS)
        .create_token_request("default", &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .and_then(|s| s.token)
        .expect("a token");
    let body = json!({"session": "lp-meter", "sequence": 1, "wantUSD": "0.50",
        "usage": {"inputTokens": 12_000, "cachedInputTokens": 0, "outputTokens": 3_000, "totalTokens": 15_000, "costUSD": "0.0036",
                  "models": [{"model": "gpt-4o-mini", "inputTokens": 12_000, "cachedInputTokens": 0, "outputTokens": 3_000, "costUSD": "0.0036"}]}});
    // Over HTTPS, trusting the CA the operator made in its namespace (controller/meter_tls.rs).
    let tls = Api::<Secret>::namespaced(admin.clone(), SYSTEM).get(agentgate::domain::meter_tls::DEFAULT_SECRET).await.unwrap();
    let ca = tls.data.unwrap()[agentgate::domain::meter_tls::CA_CERT_KEY].0.clone();
    let request = http::Request::post(format!("https://127.0.0.1:{port}/v1/sync"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let client = agentgate::meter::grant_client::pinned_client(&ca).unwrap();
    let response = client.request(request).await.expect("meter API");
    let status = response.status();
    let answer = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
}

#[tokio::test]
async fn the_operator_uses_every_right_it_has_and_no_other_and_never_leaks_a_secret() {
    let cp = ControlPlane::shared_with_audit_log();
    let admin = cp.client("admin").await;
    cp.namespace(SYSTEM).await;
    labelled_namespace(cp, &admin, TOOLS, json!({DISCOVERY: "on"})).await;
    // Agent Pods must pass the restricted Pod Security Standard where it is enforced.
    labelled_namespace(cp, &admin, JOBS, json!({DISCOVERY: "on", "pod-security.kubernetes.io/enforce": "restricted"})).await;

    // The operator's identity and rights, exactly as deploy/ has them.
    let rbac = deploy_objects(&["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]);
    let pp = PatchParams::apply("least-privilege-test").force();
    for object in &rbac {
        apply(&admin, object, &pp).await;
    }
    // The operator's rights are the roles bound to its ServiceAccount; deploy/ also has roles
    // for people (the AgentJobTemplate reader and editor).
    let bound: BTreeSet<(String, String)> = rbac
        .iter()
        .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding")
        .filter(|b| b["subjects"].as_array().into_iter().flatten().any(|s| s["kind"] == "ServiceAccount" && s["name"] == "agentgate"))
        .map(|b| (b["roleRef"]["kind"].as_str().unwrap().to_string(), b["roleRef"]["name"].as_str().unwrap().to_string()))
        .collect();
    let mut granted: BTreeMap<Right, Option<String>> = BTreeMap::new();
    for object in rbac.iter().filter(|o| {
        bound.contains(&(o["kind"].as_str().unwrap_or("").to_string(), o["metadata"]["name"].as_str().unwrap_or("").to_string()))
    }) {
        let namespace = object["metadata"]["namespace"].as_str().map(str::to_string);
        for right in rights_of(&object["rules"]) {
            // A right granted cluster-wide stays so when a Role also grants it in one namespace
            // (get on Secrets: the ClusterRole's, and the meter API certificate's Role).
            let scope = granted.entry(right).or_insert(namespace.clone());
            if namespace.is_none() {
                *scope = None;
            }
        }
    }
    let token = service_account_token(cp, "agentgate");
    let kubeconfig = cp.token_kubeconfig("agentgate-operator", &token, SYSTEM);

    let planted = format!("planted-secret-{}", std::process::id() as u64 * 7919 + 104_729);
    build_world(&admin, &planted).await;
    let meter_api_port = support::http::free_port();
    let meter_api = format!("127.0.0.1:{meter_api_port}");
    let operator = OperatorProcess::start_as(
        cp,
        &kubeconfig,
        &[
            "--metrics-addr",
            "127.0.0.1:0",
            "--meter-api-listen",
            &meter_api,
            "--meter-grant-url",
            &format!("https://{meter_api}"),
            "--lease-namespace",
            SYSTEM,
            "--discovery-namespace-selector",
            &format!("{DISCOVERY}=on"),
            // As the chart runs it: the price table ConfigMap is watched.
            "--price-config-map",
            "agentgate-prices",
        ],
    );

    // Discovery, tool readiness with credentials, the job end to end.
    let discovered = tool_ready(&admin, "lp-bandit").await;
    assert_eq!(discovered.labels().get("agentgate.dev/discovered").map(String::as_str), Some("true"));
    tool_ready(&admin, "lp-scanner").await;
    let done = run_job(&admin, meter_api_port).await;
    assert_eq!(done.status.as_ref().unwrap().usage.as_ref().unwrap().total_tokens, 15_000);
    // The Pod passed restricted admission (it exists) and carries the Secret by reference only.
    let pods = job_pods(&admin, JOBS, &done).await;
    let env = pods[0].spec.as_ref().unwrap().containers[0].env.clone().unwrap();
    let token_env = env.iter().find(|e| e.name == "TOKEN").unwrap();
    assert!(token_env.value.is_none() && token_env.value_from.as_ref().unwrap().secret_key_ref.is_some(), "{token_env:?}");
    // A Pod of a running attempt deleted behind the operator's back (before it ran, so the
    // operator lets its usage finalizer go and it vanishes): it GETs the Pod to tell a slow cache
    // from a deletion, and fails the attempt.
    let second = agent_job(
        "lp-gone",
        json!({"category": "core-security",
               "agents": {"primary": {"name": "agent", "image": "ghcr.io/acme/agent:1", "model": "gpt-4o-mini"}},
               "resources": {"cpu": "100m", "memory": "128Mi"}, "budget": {"maxCostUSD": "5.00"}}),
        json!({}),
    );
    let second = Api::<AgentJob>::namespaced(admin.clone(), JOBS).create(&PostParams::default(), &second).await.unwrap();
    vote(&cp.client("alice").await, &second, "alice", Decision::Approve).await;
    vote(&cp.client("bob").await, &second, "bob", Decision::Approve).await;
    let pod =
        wait_for("the second job's Pod", TIMEOUT, || job_pods(&admin, JOBS, &second), |p: &Vec<Pod>| p.len() == 1).await[0].name_any();
    Api::<Pod>::namespaced(admin.clone(), JOBS).delete(&pod, &Default::default()).await.unwrap();
    wait_for_job(&admin, JOBS, "lp-gone", "failed by the deleted Pod", |j| phase(j) == Some("Failed")).await;

    // What the estimator learned is persisted in the lease namespace.
    let estimator = Api::<ConfigMap>::namespaced(admin.clone(), SYSTEM);
    wait_for("the estimator ConfigMap", TIMEOUT, || async { estimator.get_opt("agentgate-estimator").await.unwrap() }, |c| c.is_some())
        .await;
    // The Service stops offering the tool: discovery deletes it.
    Api::<Service>::namespaced(admin.clone(), TOOLS)
        .patch("lp-bandit", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"agentgate.dev/tool": null}}})))
        .await
        .unwrap();
    let tools = Api::<AgentTool>::all(admin.clone());
    wait_for("lp-bandit deleted", TIMEOUT, || async { tools.get_opt("lp-bandit").await.unwrap() }, |t| t.is_none()).await;

    // Leader election renews its lease by PATCH a few seconds in; wait until the log shows one.
    let audit_log = cp.audit_log().expect("the audit log");
    wait_for(
        "a lease renewal",
        TIMEOUT,
        || async { operator_requests(&audit_log) },
        |requests: &Vec<Request>| requests.iter().any(|r| r.verb == "patch" && r.resource == "leases"),
    )
    .await;
    let requests = operator_requests(&audit_log);
    assert!(requests.len() > 20, "only {} requests of {OPERATOR_USER} in the audit log", requests.len());

    let mut failures = Vec::new();
    for r in requests.iter().filter(|r| r.code == 403) {
        failures.push(format!("refused (403): {} {}", r.verb, r.uri));
    }
    let mut used: BTreeSet<Right> = BTreeSet::new();
    for r in requests.iter().filter(|r| !r.resource.is_empty()) {
        let right = (r.verb.clone(), r.group.clone(), r.resource.clone());
        match granted.get(&right) {
            None => failures.push(format!("used without a rule granting it: {right:?} ({})", r.uri)),
            Some(Some(ns)) if r.namespace.as_deref() != Some(ns.as_str()) => {
                failures.push(format!("used outside its Role's namespace {ns}: {right:?} ({})", r.uri))
            }
            _ => {}
        }
        used.insert(right);
    }
    let creates_by_apply = apply_that_creates_needs_create(cp, &admin).await;
    for right in granted.keys().filter(|r| !used.contains(*r)) {
        let (verb, group, resource) = right;
        let rare = RARELY_USED.iter().find(|(v, g, r, _)| v == verb && g == group && r == resource);
        // The operator creates its tools, ConfigMap (and maybe Lease) by server-side apply, a
        // PATCH; if this apiserver authorizes such a PATCH as `create` too, the right is needed.
        let created_by_apply =
            verb == "create" && creates_by_apply && used.contains(&("patch".to_string(), group.clone(), resource.clone()));
        match (rare, created_by_apply) {
            (Some((_, _, _, why)), _) => eprintln!("unused here, allowed: {verb} {group}/{resource}: {why}"),
            (None, true) => eprintln!("used as part of a server-side apply that creates: {verb} {group}/{resource}"),
            (None, false) => failures.push(format!("granted but never used: {verb} {group}/{resource}")),
        }
    }
    eprintln!(
        "{} operator requests; {} rights granted, {} used; an apply that creates needs `create`: {creates_by_apply}",
        requests.len(),
        granted.len(),
        used.len()
    );

    // The planted value (and its base64) appears nowhere the operator writes or talks.
    let needles = [planted.clone(), base64(&planted)];
    let mut haystacks: Vec<(String, String)> = vec![("operator log".into(), fs::read_to_string(operator.log_path()).unwrap())];
    for (kind, text) in [
        ("events.k8s.io Events", list_json::<k8s_openapi::api::events::v1::Event>(&admin).await),
        ("core Events", list_json::<k8s_openapi::api::core::v1::Event>(&admin).await),
        ("AgentJobs", list_json::<AgentJob>(&admin).await),
        ("AgentTools", list_json::<AgentTool>(&admin).await),
        ("ApprovalVotes", list_json::<ApprovalVote>(&admin).await),
        ("Pods", list_json::<Pod>(&admin).await),
        ("ConfigMaps", list_json::<ConfigMap>(&admin).await),
    ] {
        haystacks.push((kind.to_string(), text));
    }
    for (what, text) in &haystacks {
        for needle in &needles {
            if text.contains(needle.as_str()) {
                failures.push(format!("the planted Secret value is in {what}"));
            }
        }
    }
    // The search would find it: the Secrets themselves hold it.
    let secrets = list_json::<Secret>(&admin).await;
    assert!(secrets.contains(&needles[1]), "the planted value is not in the Secrets; the search above proves nothing");

    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

async fn list_json<K>(client: &Client) -> String
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
    K::DynamicType: Default,
{
    let items = Api::<K>::all(client.clone()).list(&ListParams::default()).await.expect("listing").items;
    serde_json::to_string(&items).unwrap()
}

fn base64(s: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = s.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
