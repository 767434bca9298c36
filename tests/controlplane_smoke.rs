//! Checks that the test control plane is the expected Kubernetes version and enforces RBAC for
//! its static users, which every other integration test relies on.

mod support;

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::ListParams};
use support::controlplane::ControlPlane;

#[tokio::test]
async fn control_plane_serves_expected_version_and_enforces_rbac() {
    let control_plane = ControlPlane::shared();
    let admin = control_plane.client("admin").await;

    let version = admin.apiserver_version().await.expect("reading /version");
    assert_eq!(version.git_version, "v1.37.2");

    control_plane.namespace("smoke").await;

    let as_alice = Api::<Pod>::namespaced(control_plane.client("alice").await, "smoke");
    match as_alice.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("alice has no RBAC grants and must be forbidden, got {other:?}"),
    }

    let as_admin = Api::<Pod>::namespaced(admin, "smoke");
    let pods = as_admin.list(&ListParams::default()).await.expect("admin lists pods");
    assert!(pods.items.is_empty());
}

/// AgentTools are cluster-scoped: creating one takes a ClusterRole, which alice does not have.
#[tokio::test]
async fn only_granted_users_may_create_cluster_scoped_agent_tools() {
    let control_plane = ControlPlane::shared();
    let tool: agentgate::api::AgentTool = serde_json::from_value(serde_json::json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentTool", "metadata": {"name": "smoke-tool"},
        "spec": {"type": "api", "endpoint": {"url": "https://tool.example/v1"}, "rateLimit": 10}}))
    .unwrap();

    let as_alice = Api::<agentgate::api::AgentTool>::all(control_plane.client("alice").await);
    match as_alice.create(&Default::default(), &tool).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(status.message.contains("agenttools"), "{}", status.message);
        }
        other => panic!("alice must be forbidden to create an AgentTool, got {other:?}"),
    }

    let as_admin = Api::<agentgate::api::AgentTool>::all(control_plane.client("admin").await);
    let created = as_admin.create(&Default::default(), &tool).await.expect("admin creates the AgentTool");
    assert_eq!(created.spec.rate_limit, 10);
    as_admin.delete("smoke-tool", &Default::default()).await.expect("admin deletes it");
}
