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
    let pods = as_admin
        .list(&ListParams::default())
        .await
        .expect("admin lists pods");
    assert!(pods.items.is_empty());
}
