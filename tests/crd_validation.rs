//! The CRD schemas reject malformed objects at admission, naming the offending field.
//!
//! Every manifest in `tests/data/invalid/` is submitted to a real kube-apiserver and must be
//! rejected with a message containing each of its `# expect:` lines; the manifests in
//! `tests/data/valid/` must be accepted unchanged. Also checked here: ApprovalVote specs are
//! immutable, every CRD in `crds/` is Established, and `crds/` matches what the binary generates.

mod support;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use agentgate::api::{AgentJob, AgentTool, ApprovalVote};
use k8s_openapi::{
    api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use support::controlplane::ControlPlane;

const GROUP: &str = "agentgate.dev";
const VERSION: &str = "v1alpha1";

fn data_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(kind)
}

/// `*.yaml` files directly in `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|entry| entry.expect("reading a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

/// A test manifest: the object and the `# expect:` lines of its leading comment block.
struct Manifest {
    name: String,
    expect: Vec<String>,
    object: Value,
}

fn load(path: &Path) -> Manifest {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let expect = text
        .lines()
        .take_while(|line| line.starts_with('#'))
        .filter_map(|line| line.strip_prefix("# expect:"))
        .map(|expected| expected.trim().to_owned())
        .collect();
    let object: Value = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
    Manifest { name: path.file_name().unwrap().to_string_lossy().into_owned(), expect, object }
}

/// The API of `object`'s kind, in `namespace` unless the kind is cluster-scoped.
fn api_for(client: &Client, object: &Value, namespace: &str) -> Api<DynamicObject> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    assert_eq!(api_version, format!("{GROUP}/{VERSION}"), "test manifests are agentgate objects");
    let kind = object["kind"].as_str().expect("manifest has a kind");
    let gvk = GroupVersionKind::gvk(GROUP, VERSION, kind);
    let resource = ApiResource::from_gvk_with_plural(&gvk, &format!("{}s", kind.to_lowercase()));
    match kind {
        "AgentJob" | "ApprovalVote" => Api::namespaced_with(client.clone(), namespace, &resource),
        "AgentTool" => Api::all_with(client.clone(), &resource),
        other => panic!("unexpected kind {other}"),
    }
}

fn dynamic(object: &Value) -> DynamicObject {
    serde_json::from_value(object.clone()).expect("a manifest is a Kubernetes object")
}

/// Lets `user` manage ApprovalVotes in `namespace`, as a category head's kubectl would.
async fn allow_votes(admin: &Client, namespace: &str, user: &str) {
    let name = format!("{user}-votes");
    let role = Role {
        metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![GROUP.to_owned()]),
            resources: Some(vec!["approvalvotes".to_owned()]),
            verbs: ["create", "get", "list", "update", "patch"].map(str::to_owned).to_vec(),
            ..Default::default()
        }]),
    };
    let binding = RoleBinding {
        metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
        role_ref: RoleRef { api_group: Some("rbac.authorization.k8s.io".to_owned()), kind: "Role".to_owned(), name: name.clone() },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "User".to_owned(),
            name: user.to_owned(),
            ..Default::default()
        }]),
    };
    let apply = PatchParams::apply("crd-validation-test");
    Api::<Role>::namespaced(admin.clone(), namespace).patch(&name, &apply, &Patch::Apply(&role)).await.expect("applying the vote role");
    Api::<RoleBinding>::namespaced(admin.clone(), namespace)
        .patch(&name, &apply, &Patch::Apply(&binding))
        .await
        .expect("applying the vote role binding");
}

/// The Status of a request the apiserver must refuse, or a description of what happened instead.
fn rejection<T: std::fmt::Debug>(result: kube::Result<T>) -> Result<kube::core::Status, String> {
    match result {
        Err(kube::Error::Api(status)) => Ok(*status),
        Err(other) => Err(format!("failed without an API status: {other}")),
        Ok(accepted) => Err(format!("was accepted: {accepted:?}")),
    }
}

/// Every key of `expected` is in `actual` with the same value (defaults may add keys).
fn assert_contained(expected: &Value, actual: &Value, path: &str, file: &str) {
    match (expected, actual) {
        (Value::Object(expected), Value::Object(actual)) => {
            for (key, value) in expected {
                let field = format!("{path}.{key}");
                let stored = actual.get(key).unwrap_or_else(|| panic!("{file}: {field} was pruned by the apiserver"));
                assert_contained(value, stored, &field, file);
            }
        }
        (Value::Array(expected), Value::Array(actual)) => {
            assert_eq!(expected.len(), actual.len(), "{file}: length of {path}");
            for (i, (value, stored)) in expected.iter().zip(actual).enumerate() {
                assert_contained(value, stored, &format!("{path}[{i}]"), file);
            }
        }
        _ => assert_eq!(expected, actual, "{file}: {path} changed on the way in"),
    }
}

#[tokio::test]
async fn malformed_manifests_are_rejected_naming_the_field() {
    let control_plane = ControlPlane::shared();
    let admin = control_plane.client("admin").await;
    let namespace = "crd-invalid";
    control_plane.namespace(namespace).await;

    let files = yaml_files(&data_dir("invalid"));
    assert!(files.len() >= 30, "expected at least 30 malformed manifests, found {}", files.len());

    let dry_run = PostParams { dry_run: true, ..Default::default() };
    let mut failures = Vec::new();
    for file in &files {
        let manifest = load(file);
        if manifest.expect.is_empty() {
            failures.push(format!("{}: has no `# expect: <message substring>` line", manifest.name));
            continue;
        }
        // Server-side dry run: full decoding, defaulting, schema and CEL validation and
        // admission, without persisting anything (AgentTools are cluster-scoped).
        let result = api_for(&admin, &manifest.object, namespace).create(&dry_run, &dynamic(&manifest.object)).await;
        let status = match rejection(result) {
            Ok(status) => status,
            Err(what) => {
                failures.push(format!("{}: {what}", manifest.name));
                continue;
            }
        };
        eprintln!("{}: {} {}", manifest.name, status.code, status.message);
        if status.code != 422 {
            failures.push(format!(
                "{}: expected HTTP 422 Unprocessable Entity, got {} ({}): {}",
                manifest.name, status.code, status.reason, status.message
            ));
            continue;
        }
        for expected in &manifest.expect {
            if !status.message.contains(expected.as_str()) {
                failures.push(format!("{}: message does not contain {expected:?}: {}", manifest.name, status.message));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} malformed manifests were not rejected as expected:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn valid_manifests_are_accepted_unchanged() {
    let control_plane = ControlPlane::shared();
    let admin = control_plane.client("admin").await;
    let namespace = "crd-valid";
    control_plane.namespace(namespace).await;
    allow_votes(&admin, namespace, "alice").await;
    let alice = control_plane.client("alice").await;

    let files = yaml_files(&data_dir("valid"));
    let kinds: Vec<String> = files.iter().map(|f| load(f).object["kind"].as_str().unwrap_or_default().to_owned()).collect();
    for kind in ["AgentJob", "AgentTool", "ApprovalVote"] {
        assert!(kinds.iter().any(|k| k == kind), "tests/data/valid has no {kind}");
    }

    for file in &files {
        let manifest = load(file);
        let kind = manifest.object["kind"].as_str().unwrap().to_owned();
        // A vote's voter must be the identity that creates it (admission policy).
        let client = if kind == "ApprovalVote" {
            assert_eq!(manifest.object["spec"]["voter"], "alice", "{}", manifest.name);
            &alice
        } else {
            &admin
        };
        let api = api_for(client, &manifest.object, namespace);
        let created = api
            .create(&PostParams::default(), &dynamic(&manifest.object))
            .await
            .unwrap_or_else(|e| panic!("{}: rejected: {e}", manifest.name));
        let stored = serde_json::to_value(&created).unwrap();
        // Nothing was pruned as unknown or altered: the example only uses real fields.
        assert_contained(&manifest.object["spec"], &stored["spec"], "spec", &manifest.name);
        // And what the apiserver stores is what the operator's types read.
        let typed = match kind.as_str() {
            "AgentJob" => serde_json::from_value::<AgentJob>(stored.clone()).map(|_| ()),
            "AgentTool" => serde_json::from_value::<AgentTool>(stored.clone()).map(|_| ()),
            "ApprovalVote" => serde_json::from_value::<ApprovalVote>(stored.clone()).map(|_| ()),
            other => panic!("{}: unexpected kind {other}", manifest.name),
        };
        typed.unwrap_or_else(|e| panic!("{}: stored object does not deserialize: {e}", manifest.name));
        if kind == "AgentTool" {
            // Cluster-scoped: leave nothing behind for other tests of this binary.
            let name = created.metadata.name.as_deref().unwrap();
            api.delete(name, &DeleteParams::default()).await.unwrap_or_else(|e| panic!("{}: deleting: {e}", manifest.name));
        }
    }
}

#[tokio::test]
async fn approval_vote_spec_is_immutable_but_status_is_not() {
    const IMMUTABLE: &str = "ApprovalVote spec is immutable";
    let control_plane = ControlPlane::shared();
    let admin = control_plane.client("admin").await;
    let namespace = "crd-vote-immutable";
    control_plane.namespace(namespace).await;
    allow_votes(&admin, namespace, "alice").await;
    let alice = control_plane.client("alice").await;

    let manifest = load(&data_dir("valid").join("approvalvote.yaml"));
    let name = manifest.object["metadata"]["name"].as_str().unwrap().to_owned();
    let as_alice = api_for(&alice, &manifest.object, namespace);
    let as_admin = api_for(&admin, &manifest.object, namespace);
    let created = as_alice.create(&PostParams::default(), &dynamic(&manifest.object)).await.expect("creating the vote");
    assert_eq!(created.data["spec"]["decision"], "Approve");

    let mut failures = Vec::new();
    let mut expect_immutable = |what: &str, result: Result<kube::core::Status, String>| match result {
        Ok(status) if status.code == 422 && status.message.contains(IMMUTABLE) && status.message.contains("spec") => {
            eprintln!("{what}: {} {}", status.code, status.message);
        }
        Ok(status) => failures.push(format!("{what}: unexpected rejection {} {}", status.code, status.message)),
        Err(what_happened) => failures.push(format!("{what}: {what_happened}")),
    };

    let flip = json!({ "spec": { "decision": "Reject" } });
    expect_immutable(
        "merge patch of spec.decision by admin",
        rejection(as_admin.patch(&name, &PatchParams::default(), &Patch::Merge(&flip)).await),
    );
    expect_immutable(
        "merge patch of spec.decision by the voter",
        rejection(as_alice.patch(&name, &PatchParams::default(), &Patch::Merge(&flip)).await),
    );
    let mut replaced = created.clone();
    replaced.data["spec"]["decision"] = json!("Reject");
    expect_immutable("replace with another decision by admin", rejection(as_admin.replace(&name, &PostParams::default(), &replaced).await));
    let mut retargeted = created.clone();
    retargeted.data["spec"]["jobRef"]["generation"] = json!(2);
    expect_immutable(
        "replace with another jobRef.generation by admin",
        rejection(as_admin.replace(&name, &PostParams::default(), &retargeted).await),
    );
    let reason = json!({ "spec": { "reason": "changed my mind" } });
    expect_immutable(
        "merge patch of spec.reason by admin",
        rejection(as_admin.patch(&name, &PatchParams::default(), &Patch::Merge(&reason)).await),
    );
    assert!(failures.is_empty(), "vote spec changes were not all rejected:\n{}", failures.join("\n"));

    // The operator records its verdict in the status subresource; the spec rule must not block it.
    let status = json!({ "status": { "counted": true, "message": "counted toward approval", "observedGeneration": 1 } });
    let updated = as_admin
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("status of an immutable vote can change");
    assert_eq!(updated.data["status"]["counted"], json!(true));
    let status = json!({ "status": { "counted": false, "message": "job changed: vote is for generation 1" } });
    let updated = as_admin
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("status of an immutable vote can change again");
    assert_eq!(updated.data["status"]["counted"], json!(false));
    // Metadata (labels, finalizers) stays mutable too.
    let labels = json!({ "metadata": { "labels": { "agentgate.dev/job": "security-scan-42" } } });
    as_admin.patch(&name, &PatchParams::default(), &Patch::Merge(&labels)).await.expect("labels of an immutable vote can change");

    let stored = as_admin.get(&name).await.expect("reading the vote back");
    assert_eq!(stored.data["spec"], created.data["spec"], "the vote's spec never changed");
}

#[tokio::test]
async fn every_crd_in_crds_dir_is_established() {
    let control_plane = ControlPlane::shared();
    let crds = Api::<CustomResourceDefinition>::all(control_plane.client("admin").await);
    let files = yaml_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("crds"));
    assert!(!files.is_empty(), "crds/ holds no CRDs");
    let mut failures = Vec::new();
    for file in &files {
        let manifest = load(file);
        assert_eq!(manifest.object["kind"], "CustomResourceDefinition", "{}", manifest.name);
        let name = manifest.object["metadata"]["name"].as_str().expect("a CRD has a name");
        let crd = match crds.get(name).await {
            Ok(crd) => crd,
            Err(e) => {
                failures.push(format!("{}: {name} is not installed: {e}", manifest.name));
                continue;
            }
        };
        let conditions: BTreeMap<String, String> =
            crd.status.and_then(|status| status.conditions).unwrap_or_default().into_iter().map(|c| (c.type_, c.status)).collect();
        for condition in ["NamesAccepted", "Established"] {
            if conditions.get(condition).map(String::as_str) != Some("True") {
                failures.push(format!("{}: {name} is not {condition}: {conditions:?}", manifest.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn crds_dir_is_not_stale() {
    let generated = tempfile::tempdir().expect("creating a temporary directory");
    let output = Command::new(env!("CARGO_BIN_EXE_agentgate"))
        .args(["crds", "--out-dir"])
        .arg(generated.path())
        .output()
        .expect("running agentgate crds");
    assert!(output.status.success(), "agentgate crds failed: {}", String::from_utf8_lossy(&output.stderr));
    let read_all = |dir: &Path| -> BTreeMap<String, Vec<u8>> {
        yaml_files(dir)
            .into_iter()
            .map(|path| {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                (name, fs::read(&path).unwrap())
            })
            .collect()
    };
    let checked_in = read_all(&Path::new(env!("CARGO_MANIFEST_DIR")).join("crds"));
    let fresh = read_all(generated.path());
    let mut differences = Vec::new();
    for (name, content) in &fresh {
        match checked_in.get(name) {
            None => differences.push(format!("crds/{name} is missing")),
            Some(old) if old != content => differences.push(format!("crds/{name} differs")),
            Some(_) => {}
        }
    }
    for name in checked_in.keys().filter(|name| !fresh.contains_key(*name)) {
        differences.push(format!("crds/{name} is no longer generated"));
    }
    assert!(differences.is_empty(), "crds/ is stale: run `make crds`\n{}", differences.join("\n"));
}
