//! The Helm chart and the plain manifests of deploy/, with a real helm (built from its Go module)
//! against the real apiserver: lint, drift between the two, install, and `kubectl apply -k`.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use serde_json::Value;
use support::cluster::wait_for;
use support::controlplane::{ControlPlane, ControllerManager};
use support::tools::helm;

const CHART: &str = "charts/agentgate";
const RELEASE: &str = "agentgate";
const NAMESPACE: &str = "agentgate-system";
/// Every optional object of the chart that this control plane can accept (the ServiceMonitor
/// needs the Prometheus Operator's CRD, which is not here).
const OPTIONAL_OBJECTS: &[&str] = &[
    "--set",
    "networkPolicy.enabled=true",
    "--set",
    "grafanaDashboard.enabled=true",
    "--set",
    "discovery.namespaceSelector=agentgate.dev/discovery=enabled",
    "--set",
    "approval.timeoutSeconds=86400",
    "--set-json",
    r#"approval.tiers=[{"minCostUSD":"10","required":3,"humanGroup":"agentgate:humans"}]"#,
    "--set-json",
    r#"rbac.secrets.namespaces=["agentgate-system"]"#,
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program).current_dir(root()).args(args).output().unwrap_or_else(|e| panic!("running {}: {e}", program.display()))
}

fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed with {}:\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn helm_template(extra: &[&str]) -> String {
    let mut args = vec!["template", RELEASE, CHART, "--namespace", NAMESPACE];
    args.extend_from_slice(extra);
    ok("helm template", run(&helm(), &args))
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml).expect("rendered YAML parses").into_iter().filter(|d| !d.is_null()).collect()
}

/// `kind/namespace/name` of each object.
fn ids(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| {
            let m = &o["metadata"];
            format!("{}/{}/{}", o["kind"].as_str().unwrap(), m["namespace"].as_str().unwrap_or(""), m["name"].as_str().unwrap())
        })
        .collect()
}

#[test]
fn helm_lint_is_clean_with_default_and_optional_values() {
    let out = ok("helm lint", run(&helm(), &["lint", "--strict", CHART]));
    assert!(out.contains("1 chart(s) linted, 0 chart(s) failed"), "{out}");
    assert!(!out.contains("[WARNING]") && !out.contains("[ERROR]"), "{out}");
    let mut args = vec!["lint", "--strict", CHART, "--set", "serviceMonitor.enabled=true"];
    args.extend_from_slice(OPTIONAL_OBJECTS);
    let out = ok("helm lint with every optional object", run(&helm(), &args));
    assert!(out.contains("0 chart(s) failed") && !out.contains("[WARNING]"), "{out}");
}

#[test]
fn values_schema_rejects_bad_operator_configuration() {
    for (set, field) in [
        ("approval.floor=0", "floor"),
        ("replicaCount=9", "replicaCount"),
        ("image.digest=latest", "digest"),
        ("approval.tierz=1", "tierz"),
    ] {
        let out = run(&helm(), &["template", RELEASE, CHART, "--set", set]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--set {set} rendered");
        assert!(stderr.contains("values don't meet the specifications of the schema") && stderr.contains(field), "--set {set}: {stderr}");
    }
}

#[test]
fn deploy_is_the_chart_rendered_with_default_values() {
    let committed = std::fs::read_to_string(root().join("deploy/agentgate.yaml")).expect("deploy/agentgate.yaml");
    // The file is a comment header followed by helm's output, which starts at the first `---`.
    let body = committed.find("\n---\n").map(|i| &committed[i + 1..]).expect("a header, then documents");
    let rendered = helm_template(&[]);
    if body != rendered {
        let (a, b): (Vec<&str>, Vec<&str>) = (body.lines().collect(), rendered.lines().collect());
        let first = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
        panic!(
            "deploy/agentgate.yaml drifted from `helm template` (run `make manifests`); first difference at rendered line {}:\n  deploy: {:?}\n  chart:  {:?}",
            first + 1,
            a.get(first),
            b.get(first)
        );
    }
    // What deploy/ installs is the chart's output plus the namespace and the CRDs.
    let kustomization = std::fs::read_to_string(root().join("deploy/kustomization.yaml")).unwrap();
    for resource in ["../crds", "namespace.yaml", "agentgate.yaml"] {
        assert!(kustomization.lines().any(|l| l.trim() == format!("- {resource}")), "deploy/kustomization.yaml lacks {resource}");
    }
}

fn kubectl_objects(cp: &ControlPlane, file: &Path) -> Vec<Value> {
    let out = cp.kubectl("admin", &["get", "-f", file.to_str().unwrap(), "-o", "json"]);
    let list: Value = serde_json::from_str(&ok("kubectl get -f", out)).unwrap();
    match list.get("items") {
        Some(items) => items.as_array().unwrap().clone(),
        None => vec![list],
    }
}

fn scratch(cp: &ControlPlane, name: &str, text: &str) -> PathBuf {
    let path = cp.dir().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The restricted Pod Security level on the release namespace, as deploy/namespace.yaml sets it:
/// Pods that break it are refused by the PodSecurity admission plugin.
fn restricted_namespace(cp: &ControlPlane) {
    ok(
        "kubectl apply namespace",
        cp.kubectl("admin", &["apply", "--server-side", "-f", root().join("deploy/namespace.yaml").to_str().unwrap()]),
    );
}

#[tokio::test]
async fn helm_install_creates_every_object_and_the_operator_pods_pass_restricted_pod_security() {
    let cp = ControlPlane::shared();
    restricted_namespace(cp);
    let kubeconfig = cp.kubeconfig("admin");
    // The harness installed the CRDs and admission policies already (as every test binary's
    // control plane does); helm skips existing CRDs and takes the policies over, fields the
    // harness applied included (helm 4 installs by server-side apply).
    let mut args = vec![
        "install",
        RELEASE,
        CHART,
        "--namespace",
        NAMESPACE,
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--take-ownership",
        "--force-conflicts",
        "--timeout",
        "2m",
    ];
    args.extend_from_slice(OPTIONAL_OBJECTS);
    let started = std::time::Instant::now();
    let out = ok("helm install", run(&helm(), &args));
    eprintln!("helm install took {:.1?}", started.elapsed());
    assert!(out.contains("STATUS: deployed"), "{out}");

    let manifest =
        ok("helm get manifest", run(&helm(), &["get", "manifest", RELEASE, "-n", NAMESPACE, "--kubeconfig", kubeconfig.to_str().unwrap()]));
    let rendered = documents(&manifest);
    let expected = ids(&rendered);
    let kinds: BTreeSet<&str> = rendered.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "MutatingAdmissionPolicy",
        "MutatingAdmissionPolicyBinding",
    ] {
        assert!(kinds.contains(kind), "the release has no {kind}: {kinds:?}");
    }
    let live = kubectl_objects(cp, &scratch(cp, "helm-release.yaml", &manifest));
    assert_eq!(ids(&live), expected, "objects in the cluster differ from the release's manifest");
    // The admission policies are a verbatim copy of deploy/admission and carry no chart labels.
    for o in live.iter().filter(|o| !o["kind"].as_str().unwrap().contains("AdmissionPolicy")) {
        assert_eq!(o["metadata"]["labels"]["app.kubernetes.io/managed-by"], "Helm", "{}", o["metadata"]["name"]);
    }

    let deployment = live.iter().find(|o| o["kind"] == "Deployment").unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    let args: Vec<&str> = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    for pair in [
        ["--discovery-namespace-selector", "agentgate.dev/discovery=enabled"],
        ["--approval-timeout-seconds", "86400"],
        ["--approval-tier", "minCostUSD=10,required=3,humanGroup=agentgate:humans"],
        ["--lease-namespace", NAMESPACE],
        // The ConfigMap the chart ships, watched by name (the operator reads it through the API).
        ["--price-config-map", "agentgate-prices"],
    ] {
        assert!(args.windows(2).any(|w| w == pair), "{pair:?} not in {args:?}");
    }
    let dashboard = live.iter().find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "agentgate-dashboard").unwrap();
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: Value = serde_json::from_str(dashboard["data"]["agentgate.json"].as_str().unwrap()).expect("the dashboard is JSON");
    assert_eq!(json["uid"], "agentgate-overview");

    // No kubelet runs here, but the Deployment and ReplicaSet controllers do create the Pods,
    // and the PodSecurity admission plugin refuses any that break the restricted level.
    let _controllers = ControllerManager::start(cp, "deployment,replicaset");
    let client = cp.client("admin").await;
    let pods: Api<Pod> = Api::namespaced(client, NAMESPACE);
    let created = wait_for(
        "the Deployment's 2 Pods",
        Duration::from_secs(90),
        || async { pods.list(&ListParams::default().labels("app.kubernetes.io/instance=agentgate")).await.unwrap().items },
        |p: &Vec<Pod>| p.len() == 2,
    )
    .await;
    for pod in created {
        let spec = pod.spec.unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some("agentgate"));
        assert_eq!(spec.containers[0].image.as_deref(), Some("ghcr.io/agentgate/agentgate:0.1.0"));
    }
}

#[test]
fn kubectl_apply_k_deploy_is_accepted_by_the_apiserver() {
    let cp = ControlPlane::shared();
    // A server-side dry run creates nothing, so objects in a namespace it would create are
    // refused; the namespace itself is applied for real first.
    restricted_namespace(cp);
    let built = ok("kubectl kustomize deploy/", cp.kubectl("admin", &["kustomize", root().join("deploy").to_str().unwrap()]));
    let objects = documents(&built);
    let out = ok(
        "kubectl apply -k deploy/ --dry-run=server",
        cp.kubectl("admin", &["apply", "-k", root().join("deploy").to_str().unwrap(), "--dry-run=server"]),
    );
    let applied = out.lines().filter(|l| l.ends_with("(server dry run)")).count();
    assert_eq!(applied, objects.len(), "{out}");
    let expected: BTreeSet<String> = ids(&documents(&helm_template(&[])));
    let kustomized = ids(&objects);
    assert!(expected.is_subset(&kustomized), "deploy/ lacks chart objects: {:?}", expected.difference(&kustomized).collect::<Vec<_>>());
    for extra in kustomized.difference(&expected) {
        assert!(
            extra.starts_with("CustomResourceDefinition/") || extra.starts_with("Namespace/"),
            "deploy/ has {extra}, the chart has not"
        );
    }
}
