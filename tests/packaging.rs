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
    for crd in ["agentjobs.yaml", "agenttools.yaml", "approvalvotes.yaml"] {
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
}

#[test]
fn operator_rbac_has_no_wildcards() {
    for path in [
        "deploy/agentgate.yaml",
        "charts/agentgate/templates/clusterrole.yaml",
        "charts/agentgate/templates/role-leader-election.yaml",
        "charts/agentgate/templates/role-secrets.yaml",
    ] {
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
