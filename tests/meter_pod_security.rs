//! An agent Pod with the meter sidecar injected still passes the restricted Pod Security
//! Standard, as the real apiserver's PodSecurity admission enforces it (server-side dry run: the
//! Pod is admitted or refused, never scheduled).

mod support;

use agentgate::api::Agent;
use agentgate::domain::pod_builder::{PodPlan, build_pod};
use agentgate::meter::sidecar::{self, MeterSidecar};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use support::controlplane::ControlPlane;

const NS: &str = "meter-pss";

fn metered_pod() -> Pod {
    let agent: Agent = serde_json::from_value(json!({"name": "coder", "image": "ghcr.io/acme/agent:1", "model": "gpt-4o-mini"})).unwrap();
    let plan = PodPlan {
        job_name: "job",
        namespace: NS,
        job_uid: "00000000-0000-0000-0000-000000000001",
        job_generation: 1,
        agent: &agent,
        attempt: 1,
        cpu: "500m",
        memory: "512Mi",
        gpu: None,
        deadline_seconds: 600,
        budget_usd: "5.00",
        input_json: "{}",
        tool_urls: &[],
    };
    let mut pod = build_pod(&plan);
    let meter = MeterSidecar {
        image: "ghcr.io/agentgate/agentgate:1".into(),
        keys_secret: "llm-keys".into(),
        openai_key: true,
        anthropic_key: true,
        openai_upstream: None,
        anthropic_upstream: None,
        budget_usd: "5.00".into(),
    };
    sidecar::inject(&mut pod, &meter);
    // A dry run admits no owner that does not exist: the owner is the operator's business.
    pod.metadata.owner_references = None;
    pod
}

#[tokio::test]
async fn a_pod_with_the_meter_sidecar_is_admitted_where_restricted_is_enforced() {
    let cp = ControlPlane::shared();
    cp.namespace(NS).await;
    let admin = cp.client("admin").await;
    let labels = json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted",
                                                 "pod-security.kubernetes.io/enforce-version": "latest"}}});
    Api::<Namespace>::all(admin.clone()).patch(NS, &PatchParams::default(), &Patch::Merge(labels)).await.expect("label namespace");
    let pods = Api::<Pod>::namespaced(admin, NS);
    let dry_run = PostParams { dry_run: true, ..PostParams::default() };

    let admitted = pods.create(&dry_run, &metered_pod()).await.expect("the metered Pod is admitted");
    let init = admitted.spec.unwrap().init_containers.unwrap();
    assert_eq!(init[0].name, sidecar::CONTAINER);
    assert_eq!(init[0].restart_policy.as_deref(), Some("Always"), "kept as a native sidecar");

    // The control: enforcement is live, and it reads the sidecar too.
    let mut careless = metered_pod();
    careless.spec.as_mut().unwrap().init_containers.as_mut().unwrap()[0].security_context = None;
    match pods.create(&dry_run, &careless).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{}", s.message);
            assert!(s.message.contains(sidecar::CONTAINER), "the refusal names the sidecar: {}", s.message);
        }
        other => panic!("a sidecar without a securityContext must be refused in {NS}, got {other:?}"),
    }
}
