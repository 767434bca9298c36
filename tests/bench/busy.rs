//! The busy cluster: what a shared production cluster puts in the operator's caches and watches
//! before a single AgentJob exists. `BUSY_PODS` foreign Pods (20,000) spread over
//! `BUSY_NAMESPACES` namespaces, each bound to a bench node (so they hold node capacity) and
//! controlled by a ReplicaSet that does not exist (no garbage collector runs here), and
//! `BUSY_RBAC` Roles and RoleBindings (2,000). While the busy rows run, a churn task terminates
//! foreign Pods (graceful deletes, which stay Terminating with no kubelet, and Pods marked
//! Failed) and changes RBAC (a Role relabelled, a RoleBinding deleted and created again).
//!
//! Every request the driver sends here is counted like its creates, so the rows' API figures
//! stay the operator's own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

use super::{Env, closed_loop, count, create, env_number, object};

pub struct Shape {
    pub pods: usize,
    pub namespaces: usize,
    pub rbac: usize,
    /// Foreign Pods terminated and RBAC objects changed per second during the busy rows.
    pub churn_per_second: u64,
}

impl Shape {
    pub fn from_env() -> Result<Shape> {
        Ok(Shape {
            pods: env_number("BUSY_PODS", 20_000)?,
            namespaces: env_number::<usize>("BUSY_NAMESPACES", 20)?.max(1),
            rbac: env_number("BUSY_RBAC", 2_000)?,
            churn_per_second: env_number("BUSY_CHURN", 10)?,
        })
    }

    fn namespace(&self, i: usize) -> String {
        format!("busy-{:02}", i % self.namespaces)
    }
}

fn foreign_pod(name: &str, node: &str) -> Pod {
    object(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "web", "pod-template-hash": "5d4f8c"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d4f8c",
                "uid": "00000000-0000-4000-8000-00000000b05e", "controller": true, "blockOwnerDeletion": true}]},
        "spec": {"nodeName": node, "restartPolicy": "Always",
            "containers": [{"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 8080}],
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}))
}

/// Fills the cluster; [`Churn::start`] then changes it while a row runs.
pub async fn populate(env: &Env, shape: &Shape) -> Result<()> {
    println!("\n==> busy cluster: {} foreign Pods over {} namespaces, {} Roles/RoleBindings", shape.pods, shape.namespaces, shape.rbac);
    let started = std::time::Instant::now();
    for i in 0..shape.namespaces {
        env.cp.namespace(&shape.namespace(i)).await;
    }
    closed_loop(shape.pods, |i| async move {
        let pods: Api<Pod> = Api::namespaced(env.admin.clone(), &shape.namespace(i));
        create(&pods, "pods", &foreign_pod(&format!("web-{i:05}"), &format!("bench-node-{}", i % 4))).await?;
        Ok(())
    })
    .await?;
    closed_loop(shape.rbac, |i| async move {
        let ns = shape.namespace(i);
        if i.is_multiple_of(2) {
            let role: Role = object(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": format!("reader-{i:05}")},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]}));
            create(&Api::<Role>::namespaced(env.admin.clone(), &ns), "roles", &role).await?;
        } else {
            create(&Api::<RoleBinding>::namespaced(env.admin.clone(), &ns), "rolebindings", &binding(i)).await?;
        }
        Ok(())
    })
    .await?;
    println!("    created in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn binding(i: usize) -> RoleBinding {
    object(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": format!("reader-{i:05}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": format!("reader-{:05}", i - 1)},
        "subjects": [{"kind": "User", "name": format!("svc-{i:05}"), "apiGroup": "rbac.authorization.k8s.io"}]}))
}

/// Foreign Pods terminating and RBAC changing in the background while it runs.
pub struct Churn {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    pub pods_terminated: Arc<AtomicU64>,
    pub rbac_changes: Arc<AtomicU64>,
}

impl Churn {
    /// `offset` picks Pods and RBAC objects not churned by an earlier run.
    pub fn start(env: &Env, shape: &Shape, offset: usize) -> Churn {
        let (stop, pods_terminated, rbac_changes) = (Arc::new(AtomicBool::new(false)), Arc::default(), Arc::default());
        let (admin, per_second, pods, namespaces, rbac) =
            (env.admin.clone(), shape.churn_per_second.max(1), shape.pods, shape.namespaces, shape.rbac);
        let task = tokio::spawn({
            let (stop, terminated, changed): (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>) =
                (stop.clone(), Arc::clone(&pods_terminated), Arc::clone(&rbac_changes));
            async move {
                let shape = Shape { pods, namespaces, rbac, churn_per_second: per_second };
                let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second as f64));
                let mut k = offset;
                while !stop.load(Ordering::Relaxed) {
                    ticks.tick().await;
                    let i = (k * 7919) % shape.pods.max(1);
                    let ns = shape.namespace(i);
                    let pod_api: Api<Pod> = Api::namespaced(admin.clone(), &ns);
                    let name = format!("web-{i:05}");
                    // Half Terminating (no kubelet confirms the delete), half Failed.
                    let pod_done = if k.is_multiple_of(2) {
                        count("DELETE", "pods", "");
                        pod_api.delete(&name, &DeleteParams::default()).await.map(|_| ())
                    } else {
                        count("PATCH", "pods", "status");
                        let failed = json!({"status": {"phase": "Failed", "reason": "Evicted"}});
                        pod_api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&failed)).await.map(|_| ())
                    };
                    if pod_done.is_ok() {
                        terminated.fetch_add(1, Ordering::Relaxed);
                    }
                    if shape.rbac >= 2 {
                        let j = 2 * ((k * 104_729) % (shape.rbac / 2)) + 1;
                        let ns = shape.namespace(j);
                        let rbac_done = if k.is_multiple_of(2) {
                            count("PATCH", "roles", "");
                            // Role j-1 was created in its own namespace, not binding j's.
                            let roles: Api<Role> = Api::namespaced(admin.clone(), &shape.namespace(j - 1));
                            let label = json!({"metadata": {"labels": {"churn": k.to_string()}}});
                            roles.patch(&format!("reader-{:05}", j - 1), &PatchParams::default(), &Patch::Merge(&label)).await.map(|_| ())
                        } else {
                            let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), &ns);
                            count("DELETE", "rolebindings", "");
                            let _ = bindings.delete(&format!("reader-{j:05}"), &DeleteParams::default()).await;
                            count("POST", "rolebindings", "");
                            bindings.create(&Default::default(), &binding(j)).await.map(|_| ())
                        };
                        if rbac_done.is_ok() {
                            changed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    k += 1;
                }
            }
        });
        Churn { stop, task, pods_terminated, rbac_changes }
    }

    /// Stops churning; returns (Pods terminated, RBAC changes).
    pub async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        (self.pods_terminated.load(Ordering::Relaxed), self.rbac_changes.load(Ordering::Relaxed))
    }
}

/// Removes the foreign Pods (forced: no kubelet would confirm) and the RBAC objects.
pub async fn clear(env: &Env, shape: &Shape) -> Result<()> {
    for i in 0..shape.namespaces {
        let ns = shape.namespace(i);
        let force = DeleteParams::default().grace_period(0);
        Api::<Pod>::namespaced(env.admin.clone(), &ns).delete_collection(&force, &ListParams::default()).await?;
        Api::<Role>::namespaced(env.admin.clone(), &ns).delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
        Api::<RoleBinding>::namespaced(env.admin.clone(), &ns).delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
    }
    Ok(())
}

/// The 1-, 5- and 15-minute load averages: the machine is shared, and every figure depends on it.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
