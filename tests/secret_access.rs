//! An AgentJob can only name Secrets its author may read (deploy/admission/secrets.yaml), against
//! the real apiserver, its authorizer and RBAC: an agent's `secretKeyRef` is resolved by the
//! kubelet under the operator's Pod, so without the policy anyone allowed to create a job could
//! read every Secret of the namespace through the agent.
//!
//! dave may create jobs but read no Secret; carol may `get` the Secret `api-token` only.

mod support;

use agentgate::api::AgentJob;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use support::cluster::*;
use support::controlplane::ControlPlane;

const NS: &str = "secret-access";

/// The namespace with two Secrets, carol allowed to read one of them; no operator (admission is
/// what is tested).
async fn setup() -> Client {
    let env = Env::builder(NS).operator(OperatorMode::Later).build().await;
    let admin = env.admin.clone();
    let pp = PatchParams::apply("secret-access-test").force();
    for name in ["api-token", "db-password"] {
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
                            "stringData": {"value": format!("{name}-value")}});
        Api::<Secret>::namespaced(admin.clone(), NS).patch(name, &pp, &Patch::Apply(&secret)).await.expect("apply Secret");
    }
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "read-api-token", "namespace": NS},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["api-token"], "verbs": ["get"]}]});
    Api::<Role>::namespaced(admin.clone(), NS).patch("read-api-token", &pp, &Patch::Apply(&role)).await.expect("apply Role");
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "carol-reads-api-token", "namespace": NS},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-api-token"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "carol"}]});
    Api::<RoleBinding>::namespaced(admin.clone(), NS).patch("carol-reads-api-token", &pp, &Patch::Apply(&binding)).await.expect("bind");
    // RBAC changes reach the authorizer through its informer: wait until carol's right shows.
    let cp = env.cp;
    wait_for(
        "carol may get api-token",
        std::time::Duration::from_secs(30),
        || async { cp.kubectl("carol", &["auth", "can-i", "get", "secret/api-token", "-n", NS]).stdout },
        |out: &Vec<u8>| String::from_utf8_lossy(out).trim() == "yes",
    )
    .await;
    admin
}

fn secret_env(var: &str, secret: &str) -> Value {
    json!({"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": "value"}}})
}

/// A job whose primary agent has `primary_env` and whose one supporting agent has `supporting_env`.
fn job(name: &str, primary_env: Value, supporting_env: Value) -> AgentJob {
    let helper = json!({"name": "helper", "image": "ghcr.io/acme/agent:1", "model": "gpt-4o-mini", "env": supporting_env});
    let lead = JobManifest::payments(name).primary("lead", "ghcr.io/acme/agent:1", "gpt-4o-mini");
    lead.spec(json!({"agents": {"primary": {"env": primary_env}, "supporting": [helper]}})).build()
}

async fn create_as(user: &str, job: &AgentJob) -> Result<AgentJob, kube::Error> {
    let client = ControlPlane::shared().client(user).await;
    Api::<AgentJob>::namespaced(client, NS).create(&PostParams::default(), job).await
}

/// A 403 from the policy whose message contains each of `fragments`.
fn assert_forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>, fragments: &[&str]) {
    match result {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{}", s.message);
            assert!(s.message.contains("ValidatingAdmissionPolicy 'agentgate-agentjob-secret-access'"), "{}", s.message);
            for f in fragments {
                assert!(s.message.contains(f), "message {:?} should contain {f:?}", s.message);
            }
        }
        other => panic!("expected a refusal naming {fragments:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_job_may_name_only_secrets_its_author_may_read() {
    let admin = setup().await;

    // dave may read no Secret: each reference is refused, in either agent, and named.
    assert_forbidden(
        create_as("dave", &job("dave-db", json!([secret_env("DB", "db-password")]), json!([]))).await,
        &["dave may not get every Secret this job names in namespace secret-access (Secret db-password (env DB of agent lead))"],
    );
    assert_forbidden(
        create_as("dave", &job("dave-helper", json!([{"name": "MODE", "value": "x"}]), json!([secret_env("TOKEN", "api-token")]))).await,
        &["(Secret api-token (env TOKEN of agent helper))"],
    );
    // A job naming no Secret is dave's to create.
    create_as("dave", &job("dave-plain", json!([{"name": "MODE", "value": "x"}]), json!([]))).await.expect("a job without Secrets");

    // carol may read api-token and nothing else.
    let carols = create_as("carol", &job("carol-token", json!([secret_env("TOKEN", "api-token")]), json!([])))
        .await
        .expect("carol may name api-token");
    assert_forbidden(
        create_as("carol", &job("carol-both", json!([secret_env("TOKEN", "api-token")]), json!([secret_env("DB", "db-password")]))).await,
        &["carol may not get every Secret this job names in namespace secret-access", "Secret db-password (env DB of agent helper)"],
    );

    // Updates: carol may not add a Secret she cannot read to her own job.
    let as_carol = Api::<AgentJob>::namespaced(ControlPlane::shared().client("carol").await, NS);
    let mut added = carols.clone();
    added.spec.agents.primary.env.push(serde_json::from_value(secret_env("DB", "db-password")).unwrap());
    assert_forbidden(
        as_carol.replace("carol-token", &PostParams::default(), &added).await,
        &["carol may not get", "Secret db-password (env DB of agent lead)"],
    );

    // dave may edit jobs, but not the spec of one that names a Secret he cannot read: he would
    // choose what the agent does with it (here, its image).
    let as_dave = Api::<AgentJob>::namespaced(ControlPlane::shared().client("dave").await, NS);
    let image = json!({"spec": {"agents": {"primary": {"name": "lead", "image": "ghcr.io/mallory/exfiltrate:1", "model": "gpt-4o-mini",
                                                       "env": [secret_env("TOKEN", "api-token")]}}}});
    assert_forbidden(
        as_dave.patch("carol-token", &PatchParams::default(), &Patch::Merge(&image)).await,
        &["dave may not get every Secret this job names in namespace secret-access (Secret api-token (env TOKEN of agent lead))"],
    );
    // A label is no change to what runs: allowed.
    as_dave
        .patch("carol-token", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"team": "payments"}}})))
        .await
        .expect("a metadata-only update is not checked");
    let stored = Api::<AgentJob>::namespaced(admin, NS).get("carol-token").await.unwrap();
    assert_eq!(stored.spec.agents.primary.image, "ghcr.io/acme/agent:1", "the image dave tried to set");
    assert_eq!(stored.spec.agents.primary.env.len(), 1, "the Secret carol could not add");
}
