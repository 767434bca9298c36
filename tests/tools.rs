//! AgentTools against a real apiserver: endpoint and credential readiness, discovery from
//! labelled Services, and rate limits shared by jobs, highest priority first. The tests play the
//! endpoint controller (EndpointSlices labelled `kubernetes.io/service-name`) and the kubelet.
//!
//! One operator serves every test of this binary: operators watching different namespaces would
//! each write their own view of a cluster-scoped tool's `status.inUse`. Discovery is limited to
//! namespaces labelled [`DISCOVERY`] with `--discovery-namespace-selector`.

mod support;

use std::time::{Duration, Instant};

use agentgate::api::Condition;
use agentgate::api::{AgentJob, AgentTool, Decision};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::cluster::*;
use support::controlplane::ControlPlane;

/// Namespaces carrying this label (value `on`) are discovered in.
const DISCOVERY: &str = "agentgate-test/discovery";
/// How long a change may take to show: watches, not periodic rechecks, must carry it.
const PROMPTLY: Duration = Duration::from_secs(5);
const TIMEOUT: Duration = Duration::from_secs(30);

/// The namespace, labelled for discovery when `discover`; the operator; nodes and voting rights.
async fn setup(ns: &str, discover: bool) -> Client {
    let labels: &[(&str, &str)] = if discover { &[(DISCOVERY, "on")] } else { &[] };
    let selector = format!("{DISCOVERY}=on");
    let env = Env::builder(ns).namespace_labels(labels).node("tools-node", "64", "256Gi", &[]);
    env.operator(OperatorMode::Shared).args(&["--discovery-namespace-selector", &selector]).build().await.admin
}

async fn label_namespace(client: &Client, ns: &str, value: Option<&str>) {
    Api::<Namespace>::all(client.clone())
        .patch(ns, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {DISCOVERY: value}}})))
        .await
        .expect("label namespace");
}

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("valid manifest")
}

/// A Service with ports `http: 8080` and `metrics: 9090`, labelled `agentgate.dev/tool: <tool>`
/// unless `tool` is None.
async fn create_service(client: &Client, ns: &str, name: &str, tool: Option<&str>, annotations: Value) -> Service {
    let labels = tool.map_or(json!({}), |t| json!({"agentgate.dev/tool": t}));
    let svc: Service = from_json(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": annotations},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 8080}, {"name": "metrics", "port": 9090}]},
    }));
    Api::<Service>::namespaced(client.clone(), ns).create(&PostParams::default(), &svc).await.expect("create Service")
}

/// Merge-patches a Service's labels and annotations (a null value removes one).
async fn patch_service(client: &Client, ns: &str, name: &str, labels: Value, annotations: Value) {
    Api::<Service>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": labels, "annotations": annotations}})))
        .await
        .expect("patch Service");
}

/// The endpoint controller's part: one endpoint of `service`, ready or not.
async fn endpoint_slice(client: &Client, ns: &str, service: &str, ready: bool) {
    let slice: EndpointSlice = from_json(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-abcde"), "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": ready}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }));
    Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .patch(&slice.name_any(), &PatchParams::apply("test-endpoint-controller").force(), &Patch::Apply(&slice))
        .await
        .expect("apply EndpointSlice");
}

async fn create_tool(client: &Client, name: &str, spec: Value) -> AgentTool {
    let tool: AgentTool =
        from_json(json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentTool", "metadata": {"name": name}, "spec": spec}));
    Api::<AgentTool>::all(client.clone()).create(&PostParams::default(), &tool).await.expect("create AgentTool")
}

async fn get_tool(client: &Client, name: &str) -> Option<AgentTool> {
    Api::<AgentTool>::all(client.clone()).get_opt(name).await.expect("get AgentTool")
}

/// Waits until the tool exists and satisfies `done`.
async fn wait_tool(client: &Client, name: &str, what: &str, timeout: Duration, done: impl Fn(&AgentTool) -> bool) -> AgentTool {
    wait_for(what, timeout, || get_tool(client, name), |t: &Option<AgentTool>| t.as_ref().is_some_and(&done)).await.unwrap()
}

async fn wait_tool_gone(client: &Client, name: &str, what: &str) {
    wait_for(what, TIMEOUT, || get_tool(client, name), |t: &Option<AgentTool>| t.is_none()).await;
}

fn tool_condition<'a>(tool: &'a AgentTool, type_: &str) -> Option<&'a Condition> {
    tool.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

fn condition_is(tool: &AgentTool, type_: &str, status: &str, reason: &str) -> bool {
    tool_condition(tool, type_).is_some_and(|c| c.status == status && c.reason == reason)
}

/// Evidence that discovery has handled every Service change made before this call: a Service
/// created now in a namespace discovery covers gets its tool. Service changes reach discovery in
/// one watch stream, in order, so a test asserting that an earlier change did nothing waits for
/// this first instead of sleeping.
async fn discovery_caught_up(client: &Client, probe: &str) {
    let ns = "tl-probe";
    ControlPlane::shared().namespace(ns).await;
    label_namespace(client, ns, Some("on")).await;
    let tool = format!("tl-probe-{probe}");
    create_service(client, ns, probe, Some(&tool), json!({})).await;
    wait_tool(client, &tool, "the probe Service discovered", TIMEOUT, |_| true).await;
}

/// Events about Service `service` in `ns`.
async fn service_events(client: &Client, ns: &str, service: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("list Events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().is_some_and(|r| r.kind.as_deref() == Some("Service") && r.name.as_deref() == Some(service)))
        .collect()
}

/// Waits for an Event on the Service with this type and reason whose note contains `fragment`.
async fn wait_service_event(client: &Client, ns: &str, service: &str, type_: &str, reason: &str, fragment: &str) -> Event {
    let events = wait_for(
        &format!("{type_} Event {reason} on Service {ns}/{service} mentioning {fragment:?}"),
        TIMEOUT,
        || service_events(client, ns, service),
        |es: &Vec<Event>| {
            es.iter().any(|e| {
                e.type_.as_deref() == Some(type_)
                    && e.reason.as_deref() == Some(reason)
                    && e.note.as_deref().is_some_and(|n| n.contains(fragment))
            })
        },
    )
    .await;
    events.into_iter().find(|e| e.reason.as_deref() == Some(reason) && e.note.as_deref().is_some_and(|n| n.contains(fragment))).unwrap()
}

fn job_manifest(name: &str, spec_patch: Value) -> AgentJob {
    let worker =
        JobManifest::new(name).job_type("tool_test").category("core-tools").primary("worker", "ghcr.io/acme/worker:1", "gpt-4o-mini");
    worker.spec(spec_patch).build()
}

/// Creates the job and has alice and bob approve it.
async fn approved_job(client: &Client, ns: &str, name: &str, spec_patch: Value) -> AgentJob {
    let cp = ControlPlane::shared();
    let job = Api::<AgentJob>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &job_manifest(name, spec_patch))
        .await
        .expect("create job");
    vote(&cp.client("alice").await, &job, "alice", Decision::Approve).await;
    vote(&cp.client("bob").await, &job, "bob", Decision::Approve).await;
    job
}

async fn wait_phase(client: &Client, ns: &str, name: &str, phase_name: &'static str) -> AgentJob {
    wait_for_job(client, ns, name, phase_name, |j| phase(j) == Some(phase_name)).await
}

fn tool_check<'a>(job: &'a AgentJob, tool: &str) -> &'a agentgate::api::ReadinessCheck {
    let name = format!("tool/{tool}");
    job.status.as_ref().unwrap().checks.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no check {name}: {:?}", job.status))
}

/// The kubelet's part: the job's only Pod ran and exited 0 with a usage report.
async fn finish_job(client: &Client, ns: &str, job: &AgentJob) {
    let pods = wait_for("the job's Pod", TIMEOUT, || job_pods(client, ns, job), |p: &Vec<Pod>| p.len() == 1).await;
    let pod = pods[0].name_any();
    run_pod(client, ns, &pod).await;
    finish_pod(client, ns, &pod, 0, &usage_report("gpt-4o-mini", 1_000, 0, 100, json!({}))).await;
}

/// `kubectl get agenttools <name>` as a column → value map, read from the header's positions.
fn kubectl_tool_row(name: &str) -> Vec<(String, String)> {
    let out = ControlPlane::shared().kubectl("admin", &["get", "agenttools", name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let row = lines.next().unwrap();
    // Columns are separated by at least two spaces; "RATE LIMIT" and "IN USE" hold one.
    let mut starts = vec![0];
    let bytes = header.as_bytes();
    for i in 1..bytes.len() {
        if bytes[i] != b' ' && bytes[i - 1] == b' ' && i >= 2 && bytes[i - 2] == b' ' {
            starts.push(i);
        }
    }
    starts
        .iter()
        .enumerate()
        .map(|(n, &start)| {
            let end = starts.get(n + 1).copied().unwrap_or(header.len().max(row.len()));
            let cell = |line: &str| line.get(start..end.min(line.len())).unwrap_or_default().trim().to_string();
            (cell(header), cell(row))
        })
        .collect()
}

fn column(row: &[(String, String)], name: &str) -> String {
    row.iter().find(|(h, _)| h == name).map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("no column {name} in {row:?}"))
}

#[tokio::test]
async fn service_endpoint_tool_is_ready_only_once_its_service_has_a_ready_endpoint() {
    let ns = "tl-endpoint";
    let client = setup(ns, false).await;
    create_service(&client, ns, "search", None, json!({})).await;
    create_tool(
        &client,
        "tl-endpoint-search",
        json!({"type": "service", "endpoint": {"service": {"namespace": ns, "name": "search", "port": 8080}}, "rateLimit": 30}),
    )
    .await;

    let tool = wait_tool(&client, "tl-endpoint-search", "NoReadyEndpoints", TIMEOUT, |t| {
        condition_is(t, "EndpointAvailable", "False", "NoReadyEndpoints")
    })
    .await;
    let status = tool.status.clone().unwrap();
    assert!(!status.ready);
    assert_eq!(status.ready_endpoints, 0);
    assert!(condition_is(&tool, "Ready", "False", "NoReadyEndpoints"), "{:?}", status.conditions);

    // An endpoint that is not ready yet does not count.
    endpoint_slice(&client, ns, "search", false).await;
    let tool = wait_tool(&client, "tl-endpoint-search", "the not-ready endpoint seen", TIMEOUT, |t| {
        tool_condition(t, "EndpointAvailable").is_some_and(|c| c.message.ends_with("has no ready endpoints (1 not ready)"))
    })
    .await;
    assert!(!tool.status.as_ref().unwrap().ready, "{:?}", tool.status);
    assert_eq!(tool.status.as_ref().unwrap().ready_endpoints, 0);

    let started = Instant::now();
    endpoint_slice(&client, ns, "search", true).await;
    let tool =
        wait_tool(&client, "tl-endpoint-search", "Ready with one endpoint", PROMPTLY, |t| t.status.as_ref().is_some_and(|s| s.ready)).await;
    eprintln!("measured: ready endpoint → tool Ready in {:?}", started.elapsed());
    let status = tool.status.unwrap();
    assert_eq!(status.ready_endpoints, 1);
    assert_eq!(status.url.as_deref(), Some("http://search.tl-endpoint.svc:8080"));
    assert_eq!(status.discovered_from, None, "a hand-written tool is not discovered");

    let row = kubectl_tool_row("tl-endpoint-search");
    assert_eq!(column(&row, "READY"), "true");
    assert_eq!(column(&row, "ENDPOINTS"), "1");

    // The endpoint goes away: the tool is not Ready, and a job needing it says which tool.
    endpoint_slice(&client, ns, "search", false).await;
    wait_tool(&client, "tl-endpoint-search", "not Ready again", PROMPTLY, |t| t.status.as_ref().is_some_and(|s| !s.ready)).await;
    approved_job(&client, ns, "needs-search", json!({"tools": [{"name": "tl-endpoint-search", "required": true}]})).await;
    let waiting = wait_for_job(&client, ns, "needs-search", "waiting for the tool", |j| {
        phase(j) == Some("WaitingForResources") && condition(j, "Ready").is_some_and(|c| c.reason == "ToolsNotReady")
    })
    .await;
    let check = tool_check(&waiting, "tl-endpoint-search");
    assert!(
        check.message.contains("required tool tl-endpoint-search is not ready: Service tl-endpoint/search has no ready endpoints"),
        "{}",
        check.message
    );
    assert_eq!(waiting.status.unwrap().missing_tools, vec!["tl-endpoint-search".to_string()]);
}

#[tokio::test]
async fn credentials_are_rechecked_as_soon_as_their_secret_changes() {
    let ns = "tl-creds";
    let client = setup(ns, false).await;
    let name = "tl-creds-vault";
    create_tool(
        &client,
        name,
        json!({"type": "api", "endpoint": {"url": "https://vault.example/v1"}, "rateLimit": 30,
        "credentials": {"secretRef": {"namespace": ns, "name": "vault-token", "key": "token"}}}),
    )
    .await;
    let tool = wait_tool(&client, name, "CredentialsPresent=False", TIMEOUT, |t| {
        condition_is(t, "CredentialsPresent", "False", "SecretKeyMissing")
    })
    .await;
    assert!(tool_condition(&tool, "CredentialsPresent").unwrap().message.contains("Secret tl-creds/vault-token does not exist"));
    assert!(condition_is(&tool, "Ready", "False", "CredentialsMissing"));

    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret: Secret =
        from_json(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vault-token"}, "stringData": {"other": "x"}}));
    let started = Instant::now();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    wait_tool(&client, name, "the Secret without the key", PROMPTLY, |t| {
        tool_condition(t, "CredentialsPresent").is_some_and(|c| c.message.contains("has no key token"))
    })
    .await;
    eprintln!("measured: Secret created → tool re-checked in {:?}", started.elapsed());

    let started = Instant::now();
    secrets.patch("vault-token", &PatchParams::default(), &Patch::Merge(json!({"stringData": {"token": "s3cr3t"}}))).await.unwrap();
    let tool = wait_tool(&client, name, "CredentialsPresent=True", PROMPTLY, |t| {
        condition_is(t, "CredentialsPresent", "True", "SecretKeyPresent")
    })
    .await;
    eprintln!("measured: key added → CredentialsPresent=True in {:?}", started.elapsed());
    assert!(tool.status.as_ref().unwrap().ready);

    let started = Instant::now();
    secrets.delete("vault-token", &DeleteParams::default()).await.unwrap();
    wait_tool(&client, name, "CredentialsPresent=False again", PROMPTLY, |t| {
        condition_is(t, "CredentialsPresent", "False", "SecretKeyMissing")
    })
    .await;
    eprintln!("measured: Secret deleted → CredentialsPresent=False in {:?}", started.elapsed());

    let log = std::fs::read_to_string(shared_operator().log_path()).unwrap();
    assert!(log.contains("watching Secrets' metadata"), "the operator watches Secrets rather than polling");
    assert!(!log.contains("s3cr3t"), "a Secret's value never reaches the log");
}

#[tokio::test]
async fn a_labelled_service_becomes_a_tool_that_follows_it_and_goes_with_its_label() {
    let ns = "tl-disc";
    let client = setup(ns, true).await;
    let name = "tl-disc-bandit";
    endpoint_slice(&client, ns, "bandit", true).await;
    create_service(
        &client,
        ns,
        "bandit",
        Some(name),
        json!({
        "agentgate.dev/tool-type": "mcp", "agentgate.dev/rate-limit": "60", "agentgate.dev/description": "Python security scanner"}),
    )
    .await;

    let tool = wait_tool(&client, name, "discovered, Ready, status.discoveredFrom", TIMEOUT, |t| {
        t.status.as_ref().is_some_and(|s| s.ready && s.discovered_from.as_deref() == Some("tl-disc/bandit"))
    })
    .await;
    assert_eq!(tool.labels().get("agentgate.dev/discovered").map(String::as_str), Some("true"));
    assert_eq!(tool.annotations().get("agentgate.dev/discovered-from").map(String::as_str), Some("tl-disc/bandit"));
    let spec = serde_json::to_value(&tool.spec).unwrap();
    assert_eq!(
        spec,
        json!({"type": "mcp", "endpoint": {"service": {"namespace": ns, "name": "bandit", "port": 8080}}, "rateLimit": 60, "description": "Python security scanner"})
    );
    assert!(condition_is(&tool, "Discovered", "True", "FromService"));
    assert!(
        tool.managed_fields()
            .iter()
            .any(|m| m.manager.as_deref() == Some("agentgate-discovery") && m.operation.as_deref() == Some("Apply"))
    );
    wait_service_event(&client, ns, "bandit", "Normal", "ToolDiscovered", &format!("created AgentTool {name}")).await;
    let row = kubectl_tool_row(name);
    assert_eq!(column(&row, "DISCOVERED"), "tl-disc/bandit");

    // Annotation changes are followed.
    let started = Instant::now();
    patch_service(
        &client,
        ns,
        "bandit",
        json!({}),
        json!({"agentgate.dev/rate-limit": "120", "agentgate.dev/port": "metrics", "agentgate.dev/description": null}),
    )
    .await;
    let tool = wait_tool(&client, name, "rate limit 120 on port 9090", PROMPTLY, |t| {
        t.spec.rate_limit == 120 && t.spec.endpoint.service.as_ref().is_some_and(|s| s.port == 9090)
    })
    .await;
    eprintln!("measured: annotation change → AgentTool updated in {:?}", started.elapsed());
    assert_eq!(tool.spec.description, None, "a removed annotation is removed from the spec");

    // So is a hand edit of the discovered tool: the Service is the source.
    Api::<AgentTool>::all(client.clone())
        .patch(name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"rateLimit": 5}})))
        .await
        .unwrap();
    wait_tool(&client, name, "the Service's rate limit back", TIMEOUT, |t| t.spec.rate_limit == 120).await;

    // A field the Service does not set, added by hand, is left alone and not fought over.
    Api::<AgentTool>::all(client.clone())
        .patch(name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"description": "hand-written note"}})))
        .await
        .unwrap();
    // Repeats of one note are one Event with a series count, as `kubectl describe` shows them.
    let updates = |es: &[Event]| -> i32 {
        es.iter().filter(|e| e.reason.as_deref() == Some("ToolUpdated")).map(|e| e.series.as_ref().map_or(1, |s| s.count)).sum()
    };
    // Two so far: the annotation change and the rate limit taken back.
    let before = updates(
        &wait_for("two ToolUpdated Events", TIMEOUT, || service_events(&client, ns, "bandit"), |es: &Vec<Event>| updates(es) >= 2).await,
    );
    for poke in 0..3 {
        patch_service(&client, ns, "bandit", json!({}), json!({"example.com/poke": poke.to_string()})).await;
    }
    discovery_caught_up(&client, "pokes").await;
    let tool = get_tool(&client, name).await.unwrap();
    assert_eq!((tool.spec.description.as_deref(), tool.spec.rate_limit), (Some("hand-written note"), 120));
    assert_eq!(updates(&service_events(&client, ns, "bandit").await), before, "no apply repeated on every pass");

    // A bad value: a Warning Event naming the annotation and value, and the tool not Ready.
    patch_service(&client, ns, "bandit", json!({}), json!({"agentgate.dev/rate-limit": "ten"})).await;
    let event = wait_service_event(&client, ns, "bandit", "Warning", "InvalidToolAnnotation", "agentgate.dev/rate-limit=\"ten\"").await;
    assert!(event.note.unwrap().contains(&format!("AgentTool {name} is not Ready")));
    let tool =
        wait_tool(&client, name, "not Ready: InvalidAnnotation", TIMEOUT, |t| condition_is(t, "Ready", "False", "InvalidAnnotation")).await;
    assert!(tool_condition(&tool, "Ready").unwrap().message.contains("agentgate.dev/rate-limit=\"ten\""));
    assert!(condition_is(&tool, "Discovered", "False", "InvalidAnnotation"));
    assert!(!tool.status.unwrap().ready);

    patch_service(&client, ns, "bandit", json!({}), json!({"agentgate.dev/rate-limit": "30"})).await;
    let tool =
        wait_tool(&client, name, "Ready again", TIMEOUT, |t| t.spec.rate_limit == 30 && t.status.as_ref().is_some_and(|s| s.ready)).await;
    assert!(!tool.annotations().contains_key("agentgate.dev/discovery-error"));

    // A discovered tool deleted by hand comes back while its Service still claims it.
    let uid = tool.metadata.uid.clone();
    Api::<AgentTool>::all(client.clone()).delete(name, &DeleteParams::default()).await.unwrap();
    wait_tool(&client, name, "recreated", TIMEOUT, |t| t.metadata.uid != uid).await;

    // The label goes: so does the tool.
    let started = Instant::now();
    patch_service(&client, ns, "bandit", json!({"agentgate.dev/tool": null}), json!({})).await;
    wait_tool_gone(&client, name, "the tool deleted with the label").await;
    eprintln!("measured: label removed → AgentTool deleted in {:?}", started.elapsed());
    wait_service_event(&client, ns, "bandit", "Normal", "ToolRemoved", &format!("deleted AgentTool {name}")).await;

    // The Service goes: so does the tool.
    create_service(&client, ns, "semgrep", Some("tl-disc-semgrep"), json!({"agentgate.dev/rate-limit": "10"})).await;
    wait_tool(&client, "tl-disc-semgrep", "discovered", TIMEOUT, |t| t.spec.rate_limit == 10).await;
    Api::<Service>::namespaced(client.clone(), ns).delete("semgrep", &DeleteParams::default()).await.unwrap();
    wait_tool_gone(&client, "tl-disc-semgrep", "the tool deleted with its Service").await;
}

#[tokio::test]
async fn a_hand_written_tool_of_the_same_name_is_never_touched() {
    let ns = "tl-hand";
    let client = setup(ns, true).await;
    let name = "tl-hand-scanner";
    let written =
        create_tool(&client, name, json!({"type": "api", "endpoint": {"url": "https://scanner.example/v1"}, "rateLimit": 7})).await;
    create_service(&client, ns, "scanner", Some(name), json!({"agentgate.dev/rate-limit": "99"})).await;

    let event = wait_service_event(&client, ns, "scanner", "Warning", "ToolNameTaken", "name taken by a hand-written AgentTool").await;
    assert!(event.note.unwrap().contains(name));
    let tool = get_tool(&client, name).await.unwrap();
    assert_eq!(tool.spec, written.spec);
    assert_eq!(tool.metadata.generation, Some(1));
    assert!(!tool.labels().contains_key("agentgate.dev/discovered") && !tool.annotations().contains_key("agentgate.dev/discovered-from"));
    assert!(tool.managed_fields().iter().all(|m| m.manager.as_deref() != Some("agentgate-discovery")), "{:?}", tool.managed_fields());
    assert_eq!(tool.status.and_then(|s| s.discovered_from), None);

    // Nor is it deleted when the label goes.
    patch_service(&client, ns, "scanner", json!({"agentgate.dev/tool": null}), json!({})).await;
    discovery_caught_up(&client, "hand").await;
    assert_eq!(get_tool(&client, name).await.unwrap().metadata.uid, written.metadata.uid);
}

#[tokio::test]
async fn two_services_claiming_one_name_are_both_told_and_neither_wins_silently() {
    let ns = "tl-conflict";
    let client = setup(ns, false).await;
    let name = "tl-conflict-shared";
    create_service(&client, ns, "one", Some(name), json!({"agentgate.dev/rate-limit": "10"})).await;
    create_service(&client, ns, "two", Some(name), json!({"agentgate.dev/rate-limit": "20"})).await;

    // Outside the namespaces the operator discovers in, nothing happens.
    discovery_caught_up(&client, "conflict").await;
    assert!(get_tool(&client, name).await.is_none(), "a namespace not matching --discovery-namespace-selector is not discovered in");
    let early = service_events(&client, ns, "one").await;
    assert!(early.is_empty(), "{:?}", early.iter().map(|e| (&e.reason, &e.note, &e.reporting_instance)).collect::<Vec<_>>());

    // Both claims come into view at once: no tool, a conflict Event on each.
    label_namespace(&client, ns, Some("on")).await;
    for svc in ["one", "two"] {
        let event = wait_service_event(&client, ns, svc, "Warning", "ToolNameConflict", "none is created").await;
        assert!(event.note.unwrap().contains(&format!("Services {ns}/one, {ns}/two all claim AgentTool {name}")));
    }
    assert!(get_tool(&client, name).await.is_none(), "neither Service wins silently");

    // One lets go: the other gets the tool.
    patch_service(&client, ns, "two", json!({"agentgate.dev/tool": null}), json!({})).await;
    let tool = wait_tool(&client, name, "discovered from one", TIMEOUT, |t| {
        t.status.as_ref().and_then(|s| s.discovered_from.as_deref()) == Some("tl-conflict/one")
    })
    .await;
    assert_eq!(tool.spec.rate_limit, 10);

    // A second claim on an existing tool: the tool stays with its Service but is not Ready while
    // the name is contested, and both are told.
    patch_service(&client, ns, "two", json!({"agentgate.dev/tool": name}), json!({})).await;
    for svc in ["one", "two"] {
        wait_service_event(&client, ns, svc, "Warning", "ToolNameConflict", "it stays discovered from tl-conflict/one but is not Ready")
            .await;
    }
    let contested =
        wait_tool(&client, name, "not Ready: ToolNameConflict", TIMEOUT, |t| condition_is(t, "Ready", "False", "ToolNameConflict")).await;
    assert_eq!((&contested.metadata.uid, contested.spec.rate_limit), (&tool.metadata.uid, 10));
    assert_eq!(contested.annotations().get("agentgate.dev/discovered-from").map(String::as_str), Some("tl-conflict/one"));
    assert!(tool_condition(&contested, "Ready").unwrap().message.contains("until the label is removed from tl-conflict/two"));

    // The owner lets go while the squatter claims: the tool does not move to the squatter. It
    // stays, not Ready, pointing at "one", until an admin decides.
    patch_service(&client, ns, "one", json!({"agentgate.dev/tool": null}), json!({})).await;
    wait_service_event(&client, ns, "two", "Warning", "ToolNameConflict", "a tool never moves to another Service by itself").await;
    let orphaned = wait_tool(&client, name, "kept, not Ready", TIMEOUT, |t| {
        condition_is(t, "Ready", "False", "ToolNameConflict")
            && tool_condition(t, "Ready").is_some_and(|c| c.message.contains("no longer carries label"))
    })
    .await;
    assert_eq!(orphaned.metadata.uid, tool.metadata.uid);
    assert_eq!(orphaned.spec.endpoint.service.as_ref().map(|s| s.name.as_str()), Some("one"), "the endpoint must not move to two");
    assert_eq!(orphaned.spec.rate_limit, 10, "nor take the squatter's annotations");
    assert_eq!(orphaned.annotations().get("agentgate.dev/discovered-from").map(String::as_str), Some("tl-conflict/one"));

    // The admin resolves it by deleting the tool: the sole claimant now gets a new one.
    Api::<AgentTool>::all(client.clone()).delete(name, &DeleteParams::default()).await.expect("admin deletes the tool");
    let handed = wait_tool(&client, name, "discovered from two", TIMEOUT, |t| {
        t.status.as_ref().and_then(|s| s.discovered_from.as_deref()) == Some("tl-conflict/two")
    })
    .await;
    assert_ne!(handed.metadata.uid, tool.metadata.uid);
    assert_eq!(handed.spec.rate_limit, 20);
}

#[tokio::test]
async fn the_agent_pod_gets_the_url_of_a_discovered_tool() {
    let ns = "tl-url";
    let client = setup(ns, true).await;
    let name = "tl-url-search";
    create_service(
        &client,
        ns,
        "search",
        Some(name),
        json!({"agentgate.dev/rate-limit": "20", "agentgate.dev/port": "8080", "agentgate.dev/tool-type": "api"}),
    )
    .await;
    endpoint_slice(&client, ns, "search", true).await;
    wait_tool(&client, name, "discovered and Ready", TIMEOUT, |t| t.status.as_ref().is_some_and(|s| s.ready)).await;

    let job = approved_job(&client, ns, "searcher", json!({"tools": [{"name": name, "required": true, "minRateLimit": 5}]})).await;
    wait_phase(&client, ns, "searcher", "Running").await;
    let pods = wait_for("the agent Pod", TIMEOUT, || job_pods(&client, ns, &job), |p: &Vec<Pod>| p.len() == 1).await;
    let env = pods[0].spec.as_ref().unwrap().containers[0].env.clone().unwrap();
    let url = env.iter().find(|e| e.name == "AGENTGATE_TOOL_TL_URL_SEARCH_URL").and_then(|e| e.value.clone());
    assert_eq!(url.as_deref(), Some("http://search.tl-url.svc:8080"), "{env:?}");
}

#[tokio::test]
/// Two jobs each needing 40 of a 60/min tool: one runs, the other waits and starts when it ends.
async fn a_job_waits_for_rate_limit_and_starts_when_a_running_job_frees_it() {
    let ns = "tl-rate";
    let client = setup(ns, false).await;
    let tool = "tl-rate-llm";
    create_tool(&client, tool, json!({"type": "api", "endpoint": {"url": "https://llm.example/v1"}, "rateLimit": 60})).await;
    wait_tool(&client, tool, "Ready", TIMEOUT, |t| t.status.as_ref().is_some_and(|s| s.ready)).await;

    let a = approved_job(&client, ns, "a", json!({"tools": [{"name": tool, "minRateLimit": 40}]})).await;
    wait_phase(&client, ns, "a", "Running").await;
    wait_tool(&client, tool, "inUse 40", TIMEOUT, |t| t.status.as_ref().is_some_and(|s| s.in_use == 40)).await;
    let row = kubectl_tool_row(tool);
    assert_eq!((column(&row, "RATE LIMIT"), column(&row, "IN USE")), ("60".to_string(), "40".to_string()), "{row:?}");

    approved_job(&client, ns, "b", json!({"tools": [{"name": tool, "minRateLimit": 40}]})).await;
    let waiting = wait_for_job(&client, ns, "b", "b waiting for rate limit", |j| {
        phase(j) == Some("WaitingForResources") && condition(j, "Ready").is_some_and(|c| c.reason == "RateLimitExhausted")
    })
    .await;
    let check = tool_check(&waiting, tool);
    assert!(!check.passed);
    assert!(check.message.contains("has 20 of 60 calls/min spare (40 in use by 1 running job(s)), the job needs 40"), "{}", check.message);

    let started = Instant::now();
    finish_job(&client, ns, &a).await;
    wait_phase(&client, ns, "a", "Succeeded").await;
    let finished = started.elapsed();
    let running = wait_phase(&client, ns, "b", "Running").await;
    eprintln!("measured: a's Pod finished → a Succeeded in {finished:?}, b Running in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(10), "b starts on the watch, not on a resync");
    assert!(tool_check(&running, tool).passed);
    wait_tool(&client, tool, "inUse 40", TIMEOUT, |t| t.status.as_ref().is_some_and(|s| s.in_use == 40)).await;
    assert_eq!(column(&kubectl_tool_row(tool), "IN USE"), "40");
}

/// Attack: the author of a running job edits its spec. Raising its `minRateLimit` to the whole
/// tool would keep every other job that needs the tool waiting while it runs; dropping the tool
/// from its spec would give back calls its agents still make, so another job starts past the
/// limit. A running attempt claims what it started with.
#[tokio::test]
async fn a_running_job_cannot_take_or_give_back_rate_limit_by_editing_its_spec() {
    let ns = "tl-claim";
    let client = setup(ns, false).await;
    let tool = "tl-claim-llm";
    create_tool(&client, tool, json!({"type": "api", "endpoint": {"url": "https://llm.example/v1"}, "rateLimit": 60})).await;
    wait_tool(&client, tool, "Ready", TIMEOUT, |t| t.status.as_ref().is_some_and(|s| s.ready)).await;
    let jobs = Api::<AgentJob>::namespaced(client.clone(), ns);
    let edit_hog = |claim: Value| {
        let jobs = jobs.clone();
        async move {
            jobs.patch("hog", &PatchParams::default(), &Patch::Merge(json!({"spec": {"tools": claim}}))).await.expect("edit hog's spec")
        }
    };
    let spec_change_seen = |generation: i64| {
        move |j: &AgentJob| {
            phase(j) == Some("Running")
                && condition(j, "SpecChangePending").is_some_and(|c| {
                    c.status == "True" && c.message.contains(&format!("generation {generation} applies from the next attempt"))
                })
        }
    };

    approved_job(&client, ns, "hog", json!({"tools": [{"name": tool, "minRateLimit": 10}]})).await;
    wait_phase(&client, ns, "hog", "Running").await;
    wait_tool(&client, tool, "inUse 10", TIMEOUT, |t| t.status.as_ref().is_some_and(|s| s.in_use == 10)).await;

    // Claims the whole tool while it runs.
    assert_eq!(edit_hog(json!([{"name": tool, "minRateLimit": 60}])).await.metadata.generation, Some(2));
    wait_for_job(&client, ns, "hog", "hog's edit followed", spec_change_seen(2)).await;
    approved_job(&client, ns, "victim", json!({"tools": [{"name": tool, "minRateLimit": 40}]})).await;
    let victim = wait_for_job(&client, ns, "victim", "victim running beside hog", |j| {
        phase(j) == Some("Running") || condition(j, "Ready").is_some_and(|c| c.reason == "RateLimitExhausted")
    })
    .await;
    assert_eq!(phase(&victim), Some("Running"), "hog's raised claim kept victim waiting: {:?}", victim.status);
    wait_tool(&client, tool, "inUse 50", TIMEOUT, |t| t.status.as_ref().is_some_and(|s| s.in_use == 50)).await;

    // Gives the tool back in its spec while its agents keep calling it.
    assert_eq!(edit_hog(json!([])).await.metadata.generation, Some(3));
    wait_for_job(&client, ns, "hog", "hog's second edit followed", spec_change_seen(3)).await;
    approved_job(&client, ns, "third", json!({"tools": [{"name": tool, "minRateLimit": 20}]})).await;
    let third = wait_for_job(&client, ns, "third", "third checked against the running claims", |j| {
        phase(j) == Some("Running") || condition(j, "Ready").is_some_and(|c| c.reason == "RateLimitExhausted")
    })
    .await;
    assert_eq!(phase(&third), Some("WaitingForResources"), "third started past the limit: {:?}", third.status);
    let check = tool_check(&third, tool);
    assert!(check.message.contains("has 10 of 60 calls/min spare (50 in use by 2 running job(s))"), "{}", check.message);
    assert_eq!(wait_tool(&client, tool, "inUse", TIMEOUT, |t| t.status.is_some()).await.status.unwrap().in_use, 50);
}

#[tokio::test]
async fn freed_rate_limit_goes_to_the_most_urgent_waiting_job_first() {
    let ns = "tl-priority";
    let client = setup(ns, false).await;
    let tool = "tl-priority-llm";
    create_tool(&client, tool, json!({"type": "api", "endpoint": {"url": "https://llm.example/v1"}, "rateLimit": 10})).await;
    wait_tool(&client, tool, "Ready", TIMEOUT, |t| t.status.as_ref().is_some_and(|s| s.ready)).await;

    let running = approved_job(&client, ns, "running", json!({"tools": [{"name": tool, "minRateLimit": 8}]})).await;
    wait_phase(&client, ns, "running", "Running").await;
    // The less urgent job waits first; the urgent one, created later, needs more.
    approved_job(&client, ns, "later", json!({"priority": 9, "tools": [{"name": tool, "minRateLimit": 3}]})).await;
    wait_phase(&client, ns, "later", "WaitingForResources").await;
    let urgent = approved_job(&client, ns, "urgent", json!({"priority": 1, "tools": [{"name": tool, "minRateLimit": 8}]})).await;
    wait_for_job(&client, ns, "urgent", "urgent waiting for rate limit", |j| {
        condition(j, "Ready").is_some_and(|c| c.reason == "RateLimitExhausted")
    })
    .await;

    // 10 calls/min free up: enough for either, not both. The urgent job gets them.
    finish_job(&client, ns, &running).await;
    wait_phase(&client, ns, "urgent", "Running").await;
    // Had the older, less urgent job taken 3 of them first, the urgent one could not have started.
    let later = wait_for_job(&client, ns, "later", "later re-checked against what urgent left", |j| {
        let name = format!("tool/{tool}");
        j.status.as_ref().is_some_and(|s| {
            s.checks.iter().any(|c| c.name == name && c.message.contains("has 2 of 10 calls/min spare (8 in use by 1 running job(s))"))
        })
    })
    .await;
    assert_eq!(phase(&later), Some("WaitingForResources"), "{:?}", later.status);
    assert!(later.status.as_ref().unwrap().attempts.is_empty(), "the less urgent job never ran");
    let check = tool_check(&later, tool);
    assert!(check.message.contains("has 2 of 10 calls/min spare"), "{}", check.message);

    finish_job(&client, ns, &urgent).await;
    wait_phase(&client, ns, "later", "Running").await;
}

/// Attack: team A's approved, most urgent job asks for a whole tool and most of the node, and
/// team A's own ResourceQuota (which it fills with its own Pods, or which is simply below the job's
/// need) keeps it from ever starting. Waiting so, it held the tool's whole rate limit and the node
/// room it would take against every other team's jobs: team B's job, which that quota does not
/// concern, waited for as long as team A liked. A job its own quota holds back now holds nothing
/// against other namespaces; a job waiting for shared capacity still does (the test above).
#[tokio::test]
async fn a_job_its_own_quota_keeps_waiting_holds_no_tool_or_node_room_against_other_teams() {
    let (team_a, team_b) = ("tl-quota-a", "tl-quota-b");
    let client = setup(team_a, false).await;
    ControlPlane::shared().namespace(team_b).await;
    let tool = "tl-quota-llm";
    create_tool(&client, tool, json!({"type": "api", "endpoint": {"url": "https://llm.example/v1"}, "rateLimit": 10})).await;
    wait_tool(&client, tool, "Ready", TIMEOUT, |t| t.status.as_ref().is_some_and(|s| s.ready)).await;
    let quota: k8s_openapi::api::core::v1::ResourceQuota = from_json(json!({"apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": "team-a"}, "spec": {"hard": {"requests.cpu": "1"}}}));
    Api::<k8s_openapi::api::core::v1::ResourceQuota>::namespaced(client.clone(), team_a)
        .create(&PostParams::default(), &quota)
        .await
        .expect("create team A's quota");

    let hog = json!({"priority": 1, "resources": {"cpu": "40", "memory": "1Gi"}, "tools": [{"name": tool, "minRateLimit": 10}]});
    approved_job(&client, team_a, "hog", hog).await;
    let held = wait_for_job(&client, team_a, "hog", "hog held back by its own quota", |j| {
        phase(j) == Some("WaitingForResources") && condition(j, "Ready").is_some_and(|c| c.reason == "QuotaExceeded")
    })
    .await;
    assert!(tool_check(&held, tool).passed, "{:?}", held.status);

    let other = json!({"resources": {"cpu": "30", "memory": "1Gi"}, "tools": [{"name": tool, "minRateLimit": 5}]});
    approved_job(&client, team_b, "other-team", other).await;
    let other = wait_for_job(&client, team_b, "other-team", "team B's job to start or wait", |j| {
        matches!(phase(j), Some("Running") | Some("WaitingForResources"))
    })
    .await;
    assert_eq!(phase(&other), Some("Running"), "team A's quota-bound job kept team B's waiting: {:?}", other.status);
    assert!(tool_check(&other, tool).passed, "{:?}", other.status);
    wait_tool(&client, tool, "inUse 5", TIMEOUT, |t| t.status.as_ref().is_some_and(|s| s.in_use == 5)).await;
    finish_job(&client, team_b, &other).await;
    wait_phase(&client, team_b, "other-team", "Succeeded").await;
}

/// Heads approve a job together with where its tools point: a tool repointed between approval and
/// start (as a replaced Service repoints a discovered tool) sends the job back for new votes.
#[tokio::test]
async fn a_tool_repointed_after_approval_needs_a_new_approval_before_the_job_starts() {
    let ns = "tl-pin";
    let client = setup(ns, false).await;
    let tool = "tl-pin-llm";
    create_tool(&client, tool, json!({"type": "api", "endpoint": {"url": "https://llm.example/v1"}, "rateLimit": 60})).await;
    wait_tool(&client, tool, "Ready", TIMEOUT, |t| t.status.as_ref().is_some_and(|s| s.ready)).await;
    // hog holds 40 of the 60 calls/min, so the job under test waits, approved, for rate limit.
    let hog = approved_job(&client, ns, "hog", json!({"tools": [{"name": tool, "minRateLimit": 40}]})).await;
    wait_phase(&client, ns, "hog", "Running").await;
    approved_job(&client, ns, "pinned", json!({"tools": [{"name": tool, "minRateLimit": 40}]})).await;
    let waiting = wait_for_job(&client, ns, "pinned", "approved, waiting, endpoints recorded", |j| {
        phase(j) == Some("WaitingForResources") && j.status.as_ref().is_some_and(|s| s.tool_endpoints.is_some())
    })
    .await;
    let record = waiting.status.as_ref().unwrap().tool_endpoints.clone().unwrap();
    assert_eq!(
        record.tools.iter().map(|t| (t.name.as_str(), t.endpoint.as_str())).collect::<Vec<_>>(),
        [(tool, "url https://llm.example/v1")]
    );
    assert_eq!(record.approved_by.len(), 2);

    Api::<AgentTool>::all(client.clone())
        .patch(tool, &PatchParams::default(), &Patch::Merge(json!({"spec": {"endpoint": {"url": "https://elsewhere.example/v1"}}})))
        .await
        .expect("repoint the tool");
    let back = wait_for_job(&client, ns, "pinned", "back to AwaitingApproval: ToolEndpointChanged", |j| {
        phase(j) == Some("AwaitingApproval") && condition(j, "Approved").is_some_and(|c| c.reason == "ToolEndpointChanged")
    })
    .await;
    let message = &condition(&back, "Approved").unwrap().message;
    assert!(
        message.contains(&format!("tool {tool} went from url https://llm.example/v1 to url https://elsewhere.example/v1")),
        "{message}"
    );
    let status = back.status.as_ref().unwrap();
    let approval = status.approval.as_ref().unwrap();
    assert_eq!(approval.summary, "0/2");
    assert_eq!(approval.ignored_votes.iter().filter(|v| v.why.contains("vote again")).count(), 2, "{:?}", approval.ignored_votes);
    assert_eq!(status.revoked_votes.len(), 2);
    assert_eq!(status.tool_endpoints, None);
    assert!(job_pods(&client, ns, &back).await.is_empty(), "no Pod for the unapproved endpoint");
    // Events go out through the bounded Event pipeline after the status write: wait for it (this
    // listed them once, and lost the race under load).
    let events = Api::<Event>::namespaced(client.clone(), ns);
    wait_for(
        "a ToolEndpointChanged Event on the job",
        TIMEOUT,
        || async { events.list(&ListParams::default()).await.unwrap().items },
        |es: &Vec<Event>| {
            es.iter().any(|e| {
                e.reason.as_deref() == Some("ToolEndpointChanged") && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("pinned")
            })
        },
    )
    .await;

    // New votes approve the new endpoint; the job starts with it once hog frees the rate limit.
    let cp = ControlPlane::shared();
    vote(&cp.client("alice").await, &back, "alice", Decision::Approve).await;
    vote(&cp.client("bob").await, &back, "bob", Decision::Approve).await;
    let reapproved = wait_for_job(&client, ns, "pinned", "approved again with the new endpoint", |j| {
        phase(j) == Some("WaitingForResources")
            && j.status
                .as_ref()
                .and_then(|s| s.tool_endpoints.as_ref())
                .is_some_and(|r| r.tools[0].endpoint == "url https://elsewhere.example/v1")
    })
    .await;
    finish_job(&client, ns, &hog).await;
    wait_phase(&client, ns, "pinned", "Running").await;
    let pods = wait_for("the agent Pod", TIMEOUT, || job_pods(&client, ns, &reapproved), |p: &Vec<Pod>| p.len() == 1).await;
    let env = pods[0].spec.as_ref().unwrap().containers[0].env.clone().unwrap();
    let url = env.iter().find(|e| e.name == "AGENTGATE_TOOL_TL_PIN_LLM_URL").and_then(|e| e.value.clone());
    assert_eq!(url.as_deref(), Some("https://elsewhere.example/v1"));
}

/// Heads approve where a job's tools point, and the record is what its agents get, retries
/// included. An optional tool nobody had registered when the job started is recorded as missing:
/// whoever registers the name afterwards (an AgentTool, or a labelled Service in a discovery
/// namespace) was approved by nobody, yet the retry's agent was given its URL. A required tool
/// repointed after the start is given, on the retry, at the endpoint the heads approved.
#[tokio::test]
async fn an_optional_tool_registered_after_the_job_started_is_given_to_none_of_its_attempts() {
    let ns = "tl-late";
    let client = setup(ns, false).await;
    let (approved, late) = ("tl-late-approved", "tl-late-squat");
    create_tool(&client, approved, json!({"type": "api", "endpoint": {"url": "https://approved.example/v1"}, "rateLimit": 60})).await;
    wait_tool(&client, approved, "Ready", TIMEOUT, |t| t.status.as_ref().is_some_and(|s| s.ready)).await;
    let tools = json!([{"name": approved, "minRateLimit": 1}, {"name": late, "required": false}]);
    let job = approved_job(&client, ns, "late", json!({"tools": tools, "limits": {"maxRetries": 2}})).await;
    let running = wait_for_job(&client, ns, "late", "running, endpoints recorded", |j| {
        phase(j) == Some("Running") && j.status.as_ref().is_some_and(|s| s.tool_endpoints.is_some())
    })
    .await;
    let record = running.status.as_ref().unwrap().tool_endpoints.clone().unwrap();
    assert_eq!(
        record.tools.iter().map(|t| (t.name.as_str(), t.endpoint.as_str())).collect::<Vec<_>>(),
        [(approved, "url https://approved.example/v1"), (late, "none")]
    );
    let env_of = |pod: &Pod, name: &str| {
        pod.spec.as_ref().unwrap().containers[0].env.clone().unwrap().into_iter().find(|e| e.name == name).and_then(|e| e.value)
    };
    let (approved_var, late_var) = ("AGENTGATE_TOOL_TL_LATE_APPROVED_URL", "AGENTGATE_TOOL_TL_LATE_SQUAT_URL");
    let first = wait_for("attempt 1's Pod", TIMEOUT, || job_pods(&client, ns, &job), |p: &Vec<Pod>| p.len() == 1).await.remove(0);
    assert_eq!(env_of(&first, approved_var).as_deref(), Some("https://approved.example/v1"));
    assert_eq!(env_of(&first, late_var), None);

    // While attempt 1 runs: the late name is registered and the approved tool repointed.
    create_tool(&client, late, json!({"type": "api", "endpoint": {"url": "https://squatter.example/v1"}, "rateLimit": 60})).await;
    wait_tool(&client, late, "Ready", TIMEOUT, |t| t.status.as_ref().is_some_and(|s| s.ready)).await;
    Api::<AgentTool>::all(client.clone())
        .patch(approved, &PatchParams::default(), &Patch::Merge(json!({"spec": {"endpoint": {"url": "https://elsewhere.example/v1"}}})))
        .await
        .expect("repoint the tool");
    wait_tool(&client, approved, "the new URL in status", TIMEOUT, |t| {
        t.status.as_ref().and_then(|s| s.url.as_deref()) == Some("https://elsewhere.example/v1")
    })
    .await;

    // Attempt 1 fails; the retry's Pod is built now, when both tools say otherwise.
    run_pod(&client, ns, &first.name_any()).await;
    finish_pod(&client, ns, &first.name_any(), 1, &usage_report("gpt-4o-mini", 1_000, 0, 100, json!({}))).await;
    let pods = wait_for("attempt 2's Pod", TIMEOUT, || job_pods(&client, ns, &job), |p: &Vec<Pod>| p.len() == 2).await;
    let retry = pods.iter().find(|p| p.name_any() != first.name_any()).unwrap();
    assert_eq!(env_of(retry, approved_var).as_deref(), Some("https://approved.example/v1"), "the approved endpoint, not the new one");
    assert_eq!(env_of(retry, late_var), None, "a tool nobody approved is given to no attempt");
}
