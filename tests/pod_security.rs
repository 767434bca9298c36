//! Agent Pods pass the restricted Pod Security Standard, as the real apiserver's PodSecurity
//! admission enforces it in a namespace labelled `pod-security.kubernetes.io/enforce=restricted`.

mod support;

use agentgate::api::{AgentJob, Decision};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use serde_json::json;
use support::cluster::*;

const NS: &str = "pss-restricted";

#[tokio::test]
async fn agent_pods_are_admitted_where_the_restricted_standard_is_enforced() {
    let env = Env::builder(NS).pod_security_restricted().node("pss-node", "64", "256Gi", &[]).build().await;
    let admin = env.admin.clone();

    // The control: enforcement is live here. A Pod as a careless manifest would have it (no
    // securityContext at all) is refused, naming what the standard requires.
    let careless: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "careless"},
        "spec": {"containers": [{"name": "agent", "image": "ghcr.io/acme/agent:1"}]}}))
    .unwrap();
    match Api::<Pod>::namespaced(admin.clone(), NS).create(&PostParams::default(), &careless).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{}", s.message);
            for requirement in ["violates PodSecurity \"restricted:latest\"", "allowPrivilegeEscalation != false", "runAsNonRoot != true"] {
                assert!(s.message.contains(requirement), "{requirement:?} not in {}", s.message);
            }
        }
        other => panic!("a Pod without a securityContext must be refused in {NS}, got {other:?}"),
    }

    // A job with two agents, a Secret-backed env var, a command and args: its Pods are admitted.
    let job = agent_job(
        "scan",
        json!({"category": "core-security",
               "agents": {"primary": {"name": "scanner", "image": "ghcr.io/acme/scanner:2.1", "model": "gpt-4o-mini",
                                      "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "gh", "key": "token"}}}]},
                          "supporting": [{"name": "fixer", "image": "ghcr.io/acme/fixer:1.4", "model": "gpt-4o-mini",
                                          "command": ["/bin/fix"], "args": ["--all"]}]},
               "resources": {"cpu": "500m", "memory": "512Mi"}, "budget": {"maxCostUSD": "5.00"}}),
        json!({}),
    );
    let job = Api::<AgentJob>::namespaced(admin.clone(), NS).create(&PostParams::default(), &job).await.expect("create job");
    vote(&env.alice, &job, "alice", Decision::Approve).await;
    vote(&env.bob, &job, "bob", Decision::Approve).await;
    let running = wait_for_job(&admin, NS, "scan", "Running", |j| phase(j) == Some("Running")).await;
    let pods =
        wait_for("both agent Pods", std::time::Duration::from_secs(30), || job_pods(&admin, NS, &running), |p: &Vec<Pod>| p.len() == 2)
            .await;
    assert_eq!(pods.iter().map(|p| p.name_any()).collect::<Vec<_>>(), ["scan-fixer-1-agentgate", "scan-scanner-1-agentgate"]);
    // Admitted as built: PodSecurity admission validates, it never mutates.
    for pod in &pods {
        let c = &pod.spec.as_ref().unwrap().containers[0];
        assert_eq!(c.security_context.as_ref().unwrap().allow_privilege_escalation, Some(false), "{}", pod.name_any());
    }
}
