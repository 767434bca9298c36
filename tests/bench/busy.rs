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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use serde::Serialize;
use serde_json::json;

use super::{
    APISERVER_IDLE_CPU, ApiserverProfile, ControlPlaneCpu, Env, Key, Window, closed_loop, count, create, env_number, key_name, object,
    start_operator,
};

#[derive(Clone, Copy)]
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
        let (admin, shape) = (env.admin.clone(), Shape { churn_per_second: shape.churn_per_second.max(1), ..*shape });
        let task = tokio::spawn({
            let (stop, terminated, changed): (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>) =
                (stop.clone(), Arc::clone(&pods_terminated), Arc::clone(&rbac_changes));
            async move {
                let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / shape.churn_per_second as f64));
                let mut k = offset;
                // Each tick's changes on a task of their own: on an overloaded apiserver a tick's
                // requests take longer than a tick, and a sequential loop fell to 2 changes/s.
                let mut in_flight = tokio::task::JoinSet::new();
                while !stop.load(Ordering::Relaxed) {
                    ticks.tick().await;
                    in_flight.spawn(churn_once(admin.clone(), shape, k, terminated.clone(), changed.clone()));
                    while in_flight.try_join_next().is_some() {}
                    k += 1;
                }
                while in_flight.join_next().await.is_some() {}
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

/// Terminates foreign Pod `k` (half deleted and left Terminating, as no kubelet confirms the
/// delete; half marked Failed) and changes RBAC object `k`.
async fn churn_once(admin: kube::Client, shape: Shape, k: usize, terminated: Arc<AtomicU64>, changed: Arc<AtomicU64>) {
    let i = (k * 7919) % shape.pods.max(1);
    let pod_api: Api<Pod> = Api::namespaced(admin.clone(), &shape.namespace(i));
    let name = format!("web-{i:05}");
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
    if shape.rbac < 2 {
        return;
    }
    let j = 2 * ((k * 104_729) % (shape.rbac / 2)) + 1;
    let rbac_done = if k.is_multiple_of(2) {
        count("PATCH", "roles", "");
        // Role j-1 was created in its own namespace, not binding j's.
        let roles: Api<Role> = Api::namespaced(admin, &shape.namespace(j - 1));
        let label = json!({"metadata": {"labels": {"churn": k.to_string()}}});
        roles.patch(&format!("reader-{:05}", j - 1), &PatchParams::default(), &Patch::Merge(&label)).await.map(|_| ())
    } else {
        let bindings: Api<RoleBinding> = Api::namespaced(admin, &shape.namespace(j));
        count("DELETE", "rolebindings", "");
        let _ = bindings.delete(&format!("reader-{j:05}"), &DeleteParams::default()).await;
        count("POST", "rolebindings", "");
        bindings.create(&Default::default(), &binding(j)).await.map(|_| ())
    };
    if rbac_done.is_ok() {
        changed.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the busy cluster costs the apiserver with no job in it, measured after [`populate`]
/// with the churn running: alone (the rate the busy rows subtract, as the empty rows subtract
/// the idle control plane's), then with an operator started and idle (its watches of every Pod
/// and all RBAC carry the churn to it).
#[derive(Debug, Serialize)]
pub struct Baseline {
    pub seconds: f64,
    /// kube-apiserver CPU ms per second with only the churn (the empty idle rate included).
    pub churn_apiserver_ms_per_second: f64,
    /// The empty control plane's, for comparison.
    pub empty_apiserver_ms_per_second: f64,
    /// The same as `churn_…` with an idle operator watching.
    pub idle_operator_apiserver_ms_per_second: f64,
    pub idle_operator_cpu_ms_per_second: Option<f64>,
    /// The idle operator's requests per second (net of the driver and the empty background).
    pub idle_operator_requests_per_second: BTreeMap<String, f64>,
}

pub async fn baseline(env: &Env, seconds: u64, background: &BTreeMap<Key, f64>) -> Result<Baseline> {
    println!("\n==> busy cluster, no jobs: an idle operator watching the churn for {seconds} s, then the churn alone");
    let period = Duration::from_secs(seconds.max(1));
    let rate = |cpu: &ControlPlaneCpu| cpu.since().0.unwrap_or(0.0) / cpu.at.elapsed().as_secs_f64() * 1000.0;
    // The idle operator first: the minute after 20,000 creates carries their aftermath (the
    // apiserver's collections of a grown heap), which would inflate the rate the busy rows
    // subtract if the churn alone came first (135-161 ms/s against 100-113 a minute later).
    let ns = "bench-busy-idle";
    env.cp.namespace(ns).await;
    let mut operator = start_operator(env, ns).await?;
    let window = Window::open(&env.admin, Some(operator.pid())).await?;
    let profile = ApiserverProfile::start(env, "busy churn idle operator");
    let cpu = ControlPlaneCpu::now();
    tokio::time::sleep(period).await;
    let with_operator = rate(&cpu);
    let operator_cpu = window.controller_stats().map(|(_, cpu)| cpu * 1000.0 / window.opened.elapsed().as_secs_f64());
    operator.kill();
    profile.finish().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = window.close(&env.admin, background).await?;

    let profile = ApiserverProfile::start(env, "busy churn only");
    let cpu = ControlPlaneCpu::now();
    tokio::time::sleep(period).await;
    let churn = rate(&cpu);
    profile.finish().await;
    let baseline = Baseline {
        seconds: period.as_secs_f64(),
        churn_apiserver_ms_per_second: churn,
        empty_apiserver_ms_per_second: *APISERVER_IDLE_CPU.lock().unwrap() * 1000.0,
        idle_operator_apiserver_ms_per_second: with_operator,
        idle_operator_cpu_ms_per_second: operator_cpu,
        idle_operator_requests_per_second: requests
            .per_second()
            .iter()
            .map(|(k, v)| (key_name(k), *v))
            .filter(|(_, v)| *v >= 0.01)
            .collect(),
    };
    println!("    {}", baseline.summary());
    Ok(baseline)
}

impl Baseline {
    pub fn summary(&self) -> String {
        let requests: Vec<String> = self.idle_operator_requests_per_second.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
        format!(
            "kube-apiserver CPU with no jobs: {:.0} ms/s empty, {:.0} ms/s with the busy cluster's churn (subtracted from the busy rows), \
             {:.0} ms/s with an idle operator watching it too (operator {} ms CPU/s; its requests/s: {})",
            self.empty_apiserver_ms_per_second,
            self.churn_apiserver_ms_per_second,
            self.idle_operator_apiserver_ms_per_second,
            self.idle_operator_cpu_ms_per_second.map_or("-".into(), |v| format!("{v:.0}")),
            if requests.is_empty() { "none".into() } else { requests.join(", ") }
        )
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
