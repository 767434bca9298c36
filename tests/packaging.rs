//! The chart, the plain manifests and the generated CRDs must say the same thing.

use std::fs;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

#[test]
fn the_chart_ships_exactly_the_generated_crds() {
    for crd in ["agentjobs.yaml", "agentjobtemplates.yaml", "agenttools.yaml", "approvalvotes.yaml"] {
        assert_eq!(
            read(&format!("charts/agentgate/crds/{crd}")),
            read(&format!("crds/{crd}")),
            "charts/agentgate/crds/{crd} is stale: run `make crds`"
        );
    }
}

#[test]
fn the_chart_ships_the_same_admission_policies_as_deploy() {
    assert_eq!(
        read("charts/agentgate/templates/admission-policies.yaml"),
        read("deploy/admission/identity.yaml"),
        "copy deploy/admission/identity.yaml to charts/agentgate/templates/admission-policies.yaml"
    );
    assert_eq!(
        read("charts/agentgate/templates/admission-secrets.yaml"),
        read("deploy/admission/secrets.yaml"),
        "copy deploy/admission/secrets.yaml to charts/agentgate/templates/admission-secrets.yaml (`make crds`)"
    );
    assert_eq!(
        read("charts/agentgate/templates/admission-pods.yaml"),
        read("deploy/admission/pods.yaml"),
        "copy deploy/admission/pods.yaml to charts/agentgate/templates/admission-pods.yaml (`make crds`)"
    );
    assert_eq!(
        read("charts/agentgate/templates/admission-limits.yaml"),
        read("deploy/admission/limits.yaml"),
        "copy deploy/admission/limits.yaml to charts/agentgate/templates/admission-limits.yaml (`make crds`)"
    );
}

#[test]
fn operator_rbac_has_no_wildcards() {
    // deploy/agentgate.yaml is the rendered chart: check every rule of every Role it holds.
    let objects: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&read("deploy/agentgate.yaml")).expect("deploy/agentgate.yaml parses");
    let roles: Vec<_> = objects.iter().filter(|o| matches!(o["kind"].as_str(), Some("ClusterRole" | "Role"))).collect();
    assert!(roles.len() >= 2, "expected the operator's ClusterRole and its leader-election Role");
    for role in roles {
        for rule in role["rules"].as_array().expect("rules") {
            for field in ["apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"] {
                for v in rule[field].as_array().into_iter().flatten() {
                    let v = v.as_str().unwrap();
                    assert!(!v.contains('*'), "{} {}: wildcard {v:?} in {field}", role["kind"], role["metadata"]["name"]);
                }
            }
        }
    }
    // Templates behind values (rbac.secrets.namespaces) do not render by default: read their text.
    for path in ["charts/agentgate/templates/clusterrole.yaml", "charts/agentgate/templates/role-secrets.yaml"] {
        let text = read(path);
        for (n, line) in text.lines().enumerate() {
            let code = line.split('#').next().unwrap_or_default();
            assert!(
                !code.contains("\"*\"") && !code.contains("'*'") && !code.contains("[*]") && !code.trim_start().starts_with("- *"),
                "{path}:{}: wildcard in {line:?}",
                n + 1
            );
        }
    }
}

#[test]
fn the_argocd_cm_snippet_carries_the_health_scripts_verbatim() {
    let cm: serde_json::Value = serde_saphyr::from_str(&read("charts/agentgate/argocd/argocd-cm.yaml")).expect("argocd-cm.yaml parses");
    for (key, file) in [
        ("resource.customizations.health.agentgate.dev_AgentJob", "charts/agentgate/argocd/agentjob-health.lua"),
        ("resource.customizations.health.agentgate.dev_AgentTool", "charts/agentgate/argocd/agenttool-health.lua"),
    ] {
        assert_eq!(cm["data"][key].as_str(), Some(read(file).as_str()), "argocd-cm.yaml's {key} differs from {file}");
    }
}

#[test]
fn the_image_runs_as_the_user_the_chart_expects() {
    let dockerfile = read("Dockerfile");
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    let user = runtime.lines().find_map(|l| l.strip_prefix("USER ")).expect("the runtime stage sets USER");
    let values: serde_json::Value = serde_saphyr::from_str(&read("charts/agentgate/values.yaml")).unwrap();
    let uid = values["securityContext"]["runAsUser"].as_i64().unwrap();
    let gid = values["securityContext"]["runAsGroup"].as_i64().unwrap();
    assert_eq!(user, format!("{uid}:{gid}"), "Dockerfile USER and the chart's securityContext disagree");
    assert!(runtime.contains(r#"ENTRYPOINT ["/usr/local/bin/agentgate"]"#), "the chart's args start with the subcommand `run`");

    // `make image` (deploy/images/build.sh, crane) makes the same image as the Dockerfile, under the
    // chart's default reference: repository ghcr.io/agentgate/agentgate, tag = appVersion = the
    // crate's version.
    let build = read("deploy/images/build.sh");
    assert!(build.contains(&format!("--user={uid}:{gid}")), "deploy/images/build.sh sets another user than the chart's");
    assert!(build.contains("--entrypoint=/usr/local/bin/agentgate"), "deploy/images/build.sh sets another entrypoint");
    let repository = values["image"]["repository"].as_str().unwrap();
    assert!(build.contains(&format!("\"{repository}:$version\"")), "deploy/images/build.sh does not make {repository}:<version>");
    let chart: serde_json::Value = serde_saphyr::from_str(&read("charts/agentgate/Chart.yaml")).unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "the chart's appVersion (default image tag) is the crate's version"
    );
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The domain layer is pure logic over plain data: it may use `crate::api` and itself, never the
/// Kubernetes shell or the programs built on it. A dependency pointing the other way is how
/// import cycles (controller ↔ server, plugin → controller) crept in before.
#[test]
fn the_domain_imports_nothing_from_the_shell() {
    const SHELL: [&str; 8] = ["controller", "server", "state", "leader", "plugin", "review", "meter", "telemetry"];
    let mut files = Vec::new();
    rust_files(&root().join("src/domain"), &mut files);
    assert!(files.len() > 5, "found the domain's files");
    let mut leaks = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        // `crate::x` and `crate::{x, ..}` alike: look at what follows each `crate::`.
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for (i, _) in code.match_indices("crate::") {
                let after = &code[i + "crate::".len()..];
                // In a group, every item's first segment; else the one path's.
                let paths: Vec<&str> = match after.strip_prefix('{') {
                    Some(group) => group.split([',', '}']).collect(),
                    None => vec![after],
                };
                let first = |p: &str| p.trim().split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or("").to_string();
                if let Some(name) = paths.into_iter().map(first).find(|n| SHELL.contains(&n.as_str())) {
                    leaks.push(format!("{}:{}: crate::{name}", file.strip_prefix(root()).unwrap().display(), n + 1));
                }
            }
        }
    }
    assert!(leaks.is_empty(), "src/domain must not import the shell; move the shared part into the domain instead:\n{}", leaks.join("\n"));
}
