//! `agentgate review` as a child process, run as a ServiceAccount that heads a category.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use super::controlplane::ControlPlane;

/// A kubeconfig authenticating as ServiceAccount `ns/name` with a fresh TokenRequest token,
/// for the same apiserver and CA as the harness's admin kubeconfig.
pub async fn service_account_kubeconfig(admin: &Client, ns: &str, name: &str) -> PathBuf {
    service_account_kubeconfig_on(ControlPlane::shared(), admin, ns, name).await
}

/// [`service_account_kubeconfig`] for the apiserver of `cp`.
pub async fn service_account_kubeconfig_on(cp: &ControlPlane, admin: &Client, ns: &str, name: &str) -> PathBuf {
    let sa: ServiceAccount =
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})).unwrap();
    let accounts = Api::<ServiceAccount>::namespaced(admin.clone(), ns);
    match accounts.create(&PostParams::default(), &sa).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating ServiceAccount {name}: {e}"),
    }
    let request = TokenRequest {
        spec: Some(TokenRequestSpec { expiration_seconds: Some(3600), ..TokenRequestSpec::default() }),
        ..TokenRequest::default()
    };
    let token = accounts
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .expect("TokenRequest")
        .status
        .expect("TokenRequest status")
        .token
        .expect("a token");

    cp.token_kubeconfig(&format!("sa-{ns}-{name}"), &token, ns)
}

/// Makes ServiceAccount `ns/reviewer` a head of `category` that may read jobs and cast votes
/// (ClusterRole and binding named `role`), and returns its kubeconfig.
pub async fn reviewer_head_of(admin: &Client, ns: &str, category: &str, role: &str) -> PathBuf {
    let pp = PatchParams::apply("review-test").force();
    let cluster_role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": role},
        "rules": [
            {"apiGroups": ["agentgate.dev"], "resources": ["categories"], "verbs": ["approve"], "resourceNames": [category]},
            {"apiGroups": ["agentgate.dev"], "resources": ["approvalvotes"], "verbs": ["create", "get", "list", "watch"]},
            {"apiGroups": ["agentgate.dev"], "resources": ["agentjobs"], "verbs": ["get", "list", "watch"]}]});
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": role},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": "reviewer", "namespace": ns}]});
    Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(admin.clone()).patch(role, &pp, &Patch::Apply(&cluster_role)).await.unwrap();
    Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(admin.clone()).patch(role, &pp, &Patch::Apply(&binding)).await.unwrap();
    service_account_kubeconfig(admin, ns, "reviewer").await
}

/// `agentgate review` as a child process, stopped (SIGKILL) when dropped.
pub struct Reviewer {
    child: tokio::process::Child,
    pub log: PathBuf,
}

impl Reviewer {
    pub fn start(kubeconfig: &Path, args: &[&str], log: PathBuf) -> Reviewer {
        let file = std::fs::File::create(&log).expect("reviewer log");
        // As for the operator: examples (the demo) compile this module too, without the variable.
        let binary = option_env!("CARGO_BIN_EXE_agentgate")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debug/agentgate"));
        let child = tokio::process::Command::new(binary)
            .arg("review")
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,agentgate=debug")
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("starting agentgate review");
        Reviewer { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("reviewer still running") as libc::pid_t;
        // SAFETY: plain kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.expect("reviewer stops on SIGTERM").unwrap()
    }
}
