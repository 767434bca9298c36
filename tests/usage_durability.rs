//! No usage is ever lost: agent Pods hold the usage-tracking finalizer until their attempt is in
//! the job's status, so a Pod deleted before the operator read it (the operator down, a leader
//! takeover) still tells what it spent; and the finalizer never keeps a Pod whose job is gone.
//! A meter cut off from the operator is counted from its termination message, and a Pod whose
//! meter said nothing through either channel is `UsageUnmeasured`, never its agent's word.
//! The test plays the kubelet by writing Pod status.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use agentgate::api::{AgentJob, Decision};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use support::cluster::*;

const FINALIZER: &str = "agentgate.dev/usage-tracking";
const TIMEOUT: Duration = Duration::from_secs(30);

async fn setup(ns: &str) -> Env {
    Env::builder(ns).node("durability-node", "64", "256Gi", &[]).build().await
}

fn manifest(name: &str) -> AgentJob {
    JobManifest::new(name).job_type("durability_scan").build()
}

/// Creates and approves the job, and waits for its one Pod.
async fn started_job(admin: &Client, alice: &Client, bob: &Client, ns: &str, name: &str) -> (AgentJob, Pod) {
    let job = Api::<AgentJob>::namespaced(admin.clone(), ns).create(&PostParams::default(), &manifest(name)).await.expect("create job");
    vote(alice, &job, "alice", Decision::Approve).await;
    vote(bob, &job, "bob", Decision::Approve).await;
    let pods = wait_for("the agent Pod", TIMEOUT, || job_pods(admin, ns, &job), |p: &Vec<Pod>| p.len() == 1).await;
    (job, pods[0].clone())
}

async fn wait_gone(admin: &Client, ns: &str, pod: &str) {
    let api: Api<Pod> = Api::namespaced(admin.clone(), ns);
    wait_for(&format!("Pod {pod} gone"), TIMEOUT, || async { api.get_opt(pod).await.expect("get Pod") }, |p: &Option<Pod>| p.is_none())
        .await;
}

#[tokio::test]
async fn a_pod_deleted_while_the_operator_is_down_still_counts() {
    let ns = "usage-durability-down";
    let mut env = setup(ns).await;
    let (admin, alice, bob) = (env.admin.clone(), env.alice.clone(), env.bob.clone());
    let (job, pod) = started_job(&admin, &alice, &bob, ns, "scan").await;
    assert!(pod.finalizers().iter().any(|f| f == FINALIZER), "agent Pods carry the usage finalizer: {:?}", pod.finalizers());
    let pod = pod.name_any();
    run_pod(&admin, ns, &pod).await;
    wait_for_job(&admin, ns, "scan", "Running", |j| phase(j) == Some("Running")).await;

    // The operator goes; the agent finishes and its Pod is deleted before anyone read it.
    env.kill_operator();
    finish_pod(&admin, ns, &pod, 0, &usage_report("gpt-4o-mini", 1200, 0, 300, json!({"findings": 2}))).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    pods.delete(&pod, &DeleteParams::default()).await.expect("delete the Pod");
    let held = pods.get(&pod).await.expect("the finalizer keeps the deleted Pod");
    assert!(held.metadata.deletion_timestamp.is_some());

    env.start_operator();
    let done = wait_for_job(&admin, ns, "scan", "Succeeded", |j| phase(j).is_some_and(|p| p != "Running")).await;
    assert_eq!(phase(&done), Some("Succeeded"), "{:?}", done.status);
    let status = done.status.unwrap();
    assert_eq!(status.usage.as_ref().map(|u| u.total_tokens), Some(1500), "the deleted Pod's usage is recorded");
    assert_eq!(status.attempts[0].usage.as_ref().map(|u| u.output_tokens), Some(300));
    assert_eq!(status.output.as_deref(), Some(&json!({"findings": 2})));
    // Recorded, the Pod is let go and its deletion completes.
    wait_gone(&admin, ns, &pod).await;
    assert!(job_pods(&admin, ns, &job).await.is_empty());
}

#[tokio::test]
async fn a_deleted_job_never_leaves_its_pods_stuck() {
    let ns = "usage-durability-orphans";
    let env = setup(ns).await;
    let (admin, alice, bob) = (env.admin.clone(), env.alice.clone(), env.bob.clone());
    let (job, pod) = started_job(&admin, &alice, &bob, ns, "scan").await;
    let pod = pod.name_any();
    run_pod(&admin, ns, &pod).await;
    wait_for_job(&admin, ns, "scan", "Running", |j| phase(j) == Some("Running")).await;

    // The job goes while its Pod runs; the Pod is then deleted as the garbage collector would.
    Api::<AgentJob>::namespaced(admin.clone(), ns).delete("scan", &DeleteParams::default()).await.expect("delete job");
    let jobs: Api<AgentJob> = Api::namespaced(admin.clone(), ns);
    wait_for("the job gone", TIMEOUT, || async { jobs.get_opt("scan").await.expect("get job") }, |j: &Option<AgentJob>| j.is_none()).await;
    Api::<Pod>::namespaced(admin.clone(), ns).delete(&pod, &DeleteParams::default()).await.expect("delete the Pod");
    wait_gone(&admin, ns, &pod).await;

    // A Pod with the finalizer that no job controls (its owner dropped) is let go too, once
    // deleted; a still-running job's unfinished Pod is not.
    let (job2, pod2) = started_job(&admin, &alice, &bob, ns, "scan2").await;
    assert_ne!(job.metadata.uid, job2.metadata.uid);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    pods.delete(&pod2.name_any(), &DeleteParams::default()).await.expect("delete the running job's Pod");
    // Unscheduled when deleted: it never ran, so the attempt fails and the Pod is released.
    wait_gone(&admin, ns, &pod2.name_any()).await;
    let failed = wait_for_job(&admin, ns, "scan2", "attempt recorded", |j| {
        j.status.as_ref().is_some_and(|s| s.attempts.first().is_some_and(|a| a.result != agentgate::api::AttemptResult::Running))
    })
    .await;
    assert!(failed.status.unwrap().attempts[0].message.as_deref().unwrap_or_default().contains("PodDeleted"));
}

/// `kubectl delete agentjob --cascade=orphan` while an attempt runs: the garbage collector (run
/// here, as a cluster runs it) takes the job's ownerReference off its Pods and deletes the job.
/// Before the fix the orphan sweep then released the running Pod's usage finalizer and left it
/// running, its meter refused by the meter API, with no job to stop it. Now the Pod is stopped
/// (deleted, then let go: its job is gone), and what the job had recorded was counted before it
/// went: the first attempt's usage is in status and marked learned, exactly once.
#[tokio::test]
async fn an_orphaning_delete_of_a_running_job_stops_its_pod_and_loses_no_recorded_usage() {
    let ns = "usage-durability-orphaning";
    let env = setup(ns).await;
    let _gc = support::controlplane::ControllerManager::start(env.cp, "garbagecollector");
    let (admin, alice, bob) = (env.admin.clone(), env.alice.clone(), env.bob.clone());
    let mut manifest = manifest("scan");
    manifest.spec.limits = Some(serde_json::from_value(json!({"maxRetries": 1})).unwrap());
    let job = Api::<AgentJob>::namespaced(admin.clone(), ns).create(&PostParams::default(), &manifest).await.expect("create job");
    vote(&alice, &job, "alice", Decision::Approve).await;
    vote(&bob, &job, "bob", Decision::Approve).await;
    let first = wait_for("attempt 1's Pod", TIMEOUT, || job_pods(&admin, ns, &job), |p: &Vec<Pod>| p.len() == 1).await;
    finish_pod(&admin, ns, &first[0].name_any(), 1, &usage_report("gpt-4o-mini", 1000, 0, 100, json!(null))).await;
    let pods = wait_for("attempt 2's Pod", TIMEOUT, || job_pods(&admin, ns, &job), |p: &Vec<Pod>| p.len() == 2).await;
    let second =
        pods.iter().find(|p| p.labels().get("agentgate.dev/attempt").map(String::as_str) == Some("2")).expect("attempt 2").name_any();
    run_pod(&admin, ns, &second).await;
    let recorded = wait_for_job(&admin, ns, "scan", "attempt 1 recorded and learned, attempt 2 running", |j| {
        j.status.as_ref().is_some_and(|s| s.attempts.len() == 2 && s.attempts[0].learned == Some(true))
    })
    .await;
    let status = recorded.status.unwrap();
    assert_eq!(status.usage.as_ref().map(|u| u.total_tokens), Some(1100), "attempt 1's usage recorded");

    let orphan = DeleteParams { propagation_policy: Some(kube::api::PropagationPolicy::Orphan), ..DeleteParams::default() };
    Api::<AgentJob>::namespaced(admin.clone(), ns).delete("scan", &orphan).await.expect("delete job, orphaning");
    let jobs: Api<AgentJob> = Api::namespaced(admin.clone(), ns);
    wait_for(
        "the job gone",
        Duration::from_secs(60),
        || async { jobs.get_opt("scan").await.expect("get job") },
        |j: &Option<AgentJob>| j.is_none(),
    )
    .await;
    // The running Pod does not outlive its job; the finished one may stay, as an orphaning delete asks.
    let api: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let left = wait_for(
        "attempt 2's Pod stopped, or left running without its owner",
        TIMEOUT,
        || async { api.get_opt(&second).await.expect("get Pod") },
        |p: &Option<Pod>| p.as_ref().is_none_or(|p| p.owner_references().is_empty()),
    )
    .await;
    if let Some(pod) = &left {
        eprintln!(
            "attempt 2's Pod after the orphaning delete: deleting {:?}, finalizers {:?}",
            pod.metadata.deletion_timestamp,
            pod.finalizers()
        );
    }
    wait_gone(&admin, ns, &second).await;
    assert!(job_pods(&admin, ns, &job).await.iter().all(|p| p.name_any() != second), "no Pod of the job runs after its orphaning delete");
}

/// How many attempts of `durability_scan` the estimator state in the ConfigMap holds.
async fn learned_runs(admin: &Client, ns: &str) -> Option<u64> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let cm = Api::<ConfigMap>::namespaced(admin.clone(), ns).get_opt("agentgate-estimator").await.expect("get ConfigMap")?;
    let state: serde_json::Value = serde_json::from_str(cm.data?.get("state.json")?).ok()?;
    // Estimator state v3: jobType → namespace → statistics.
    state["jobTypes"]["durability_scan"][ns]["n"].as_u64()
}

async fn wait_marked(admin: &Client, ns: &str, name: &str, attempts: usize) -> AgentJob {
    wait_for_job(admin, ns, name, "every attempt learned", |j| {
        j.status.as_ref().is_some_and(|s| s.attempts.len() == attempts && s.attempts.iter().all(|a| a.learned == Some(true)))
    })
    .await
}

#[tokio::test]
async fn each_attempt_is_learned_once_whatever_the_operator_was_doing_when_killed() {
    let ns = "usage-durability-learn";
    let mut env = setup(ns).await;
    let (admin, alice, bob) = (env.admin.clone(), env.alice.clone(), env.bob.clone());
    let jobs: Api<AgentJob> = Api::namespaced(admin.clone(), ns);
    let (_, pod) = started_job(&admin, &alice, &bob, ns, "scan").await;
    run_pod(&admin, ns, &pod.name_any()).await;
    finish_pod(&admin, ns, &pod.name_any(), 0, &usage_report("gpt-4o-mini", 1200, 0, 300, json!({}))).await;
    wait_marked(&admin, ns, "scan", 1).await;
    assert_eq!(learned_runs(&admin, ns).await, Some(1), "learned, and written back before the mark");

    // Killed after the estimator state was written, before the mark was: the next operator
    // finds the attempt unmarked and must not learn it twice.
    env.kill_operator();
    let unmark = json!([{"op": "add", "path": "/status/attempts/0/learned", "value": false}]);
    jobs.patch_status("scan", &kube::api::PatchParams::default(), &kube::api::Patch::<()>::Json(serde_json::from_value(unmark).unwrap()))
        .await
        .expect("unmark");
    // Killed after the usage was written, before it was learned: a job the operator recorded as
    // succeeded, with usage and `learned: false`, must be learned by the next operator. And one
    // an operator older than the mark recorded (no `learned` at all), and so learned and counted
    // already, must be marked without being learned again (controller/learning_mark.rs).
    let usage = json!({"inputTokens": 900, "cachedInputTokens": 0, "outputTokens": 100, "totalTokens": 1000, "costUSD": "0.0002",
        "models": [{"model": "gpt-4o-mini", "inputTokens": 900, "cachedInputTokens": 0, "outputTokens": 100, "costUSD": "0.0002"}]});
    for (name, learned) in [("recorded", Some(false)), ("recorded-before-the-mark", None)] {
        let other = jobs.create(&PostParams::default(), &manifest(name)).await.expect("create job");
        let mut attempt = json!({"attempt": 1, "generation": other.metadata.generation, "pods": [], "result": "Succeeded", "usage": usage});
        if let Some(learned) = learned {
            attempt["learned"] = json!(learned);
        }
        let status = json!({"status": {"phase": "Succeeded", "observedGeneration": other.metadata.generation, "attempts": [attempt]}});
        jobs.patch_status(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&status)).await.expect("write status");
    }

    env.start_operator();
    wait_marked(&admin, ns, "scan", 1).await;
    wait_marked(&admin, ns, "recorded", 1).await;
    wait_marked(&admin, ns, "recorded-before-the-mark", 1).await;
    assert_eq!(learned_runs(&admin, ns).await, Some(2), "scan and recorded learned exactly once, the older operator's attempt not again");
}

#[tokio::test]
async fn a_retry_runs_only_while_what_was_spent_plus_the_estimate_fits_the_budget() {
    let ns = "usage-durability-retry";
    let env = setup(ns).await;
    let (admin, alice, bob) = (env.admin.clone(), env.alice.clone(), env.bob.clone());
    let mut job = manifest("scan");
    job.spec.limits = Some(serde_json::from_value(json!({"maxRetries": 5})).unwrap());
    let job = Api::<AgentJob>::namespaced(admin.clone(), ns).create(&PostParams::default(), &job).await.expect("create job");
    vote(&alice, &job, "alice", Decision::Approve).await;
    vote(&bob, &job, "bob", Decision::Approve).await;
    let first = wait_for("attempt 1's Pod", TIMEOUT, || job_pods(&admin, ns, &job), |p: &Vec<Pod>| p.len() == 1).await;

    // A cheap failure is retried.
    finish_pod(&admin, ns, &first[0].name_any(), 1, &usage_report("gpt-4o-mini", 1000, 0, 100, json!(null))).await;
    let second = wait_for("attempt 2's Pod", TIMEOUT, || job_pods(&admin, ns, &job), |p: &Vec<Pod>| p.len() == 2).await;
    let second = second.iter().find(|p| p.labels().get("agentgate.dev/attempt").map(String::as_str) == Some("2")).expect("attempt 2");

    // A failure that spent most of the $5 budget (40M input tokens at $0.15/M = $6) is not:
    // another attempt would exceed it.
    finish_pod(&admin, ns, &second.name_any(), 1, &usage_report("gpt-4o-mini", 40_000_000, 0, 0, json!(null))).await;
    let failed = wait_for_job(&admin, ns, "scan", "Failed", |j| phase(j) == Some("Failed")).await;
    let succeeded = condition(&failed, "Succeeded").expect("Succeeded condition");
    assert_eq!(succeeded.reason, "BudgetExhausted", "{succeeded:?}");
    assert!(succeeded.message.contains("budget.maxCostUSD $5"), "{}", succeeded.message);
    let status = failed.status.unwrap();
    assert_eq!(status.attempts.len(), 2, "no third attempt");
    assert_eq!(status.usage.unwrap().input_tokens, 40_001_000, "both attempts' usage kept");
    let attempts: BTreeSet<String> =
        job_pods(&admin, ns, &job).await.iter().filter_map(|p| p.labels().get("agentgate.dev/attempt").cloned()).collect();
    assert!(!attempts.contains("3"), "no third Pod: {attempts:?}");
}

/// Plays the kubelet for the Pod's meter: it ran, and stopped leaving `message` (None: killed
/// before it wrote one).
async fn meter_stopped(admin: &Client, ns: &str, pod: &str, message: Option<&str>) {
    let at = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let status = json!({"status": {"initContainerStatuses": [{"name": agentgate::domain::meter_sidecar::CONTAINER,
        "image": "agentgate", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": at, "finishedAt": at, "message": message}}}]}});
    let api: Api<Pod> = Api::namespaced(admin.clone(), ns);
    api.patch_status(pod, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&status)).await.expect("the meter's status");
}

/// A meter cut off from the operator before it reported anything: what it measured is in its
/// termination message, and counts, though its agent claims 0. A meter that ran and said
/// nothing through either channel: its agent's claim is not taken, the attempt is
/// `UsageUnmeasured`, and the estimator, which learned the first job, does not learn it.
#[tokio::test]
async fn a_meter_heard_only_through_its_termination_message_counts_and_one_heard_through_neither_is_unmeasured() {
    let ns = "usage-durability-meter-message";
    let env = setup(ns).await;
    let (admin, alice, bob) = (env.admin.clone(), env.alice.clone(), env.bob.clone());
    let zero = usage_report("gpt-4o-mini", 0, 0, 0, json!({"findings": 0}));

    let (_, pod) = started_job(&admin, &alice, &bob, ns, "cut").await;
    run_pod(&admin, ns, &pod.name_any()).await;
    let mut measured = agentgate::api::Usage::default();
    let tokens = agentgate::domain::pricing::TokenCounts { input: 5_000, output: 700, ..Default::default() };
    agentgate::domain::report::add_model_usage(&mut measured, "gpt-4o-mini", &tokens, agentgate::domain::money::MicroUsd(1_170));
    measured.cost_usd = "0.00117".into();
    let message = agentgate::domain::meter_message::encode(&agentgate::domain::grants::session_key("cut-session"), &measured, 0);
    meter_stopped(&admin, ns, &pod.name_any(), Some(&message)).await;
    finish_pod(&admin, ns, &pod.name_any(), 0, &zero).await;
    let done = wait_marked(&admin, ns, "cut", 1).await;
    assert_eq!(phase(&done), Some("Succeeded"));
    let status = done.status.unwrap();
    let usage = status.usage.clone().unwrap();
    assert_eq!((usage.total_tokens, usage.cost_usd.as_str()), (5_700, "0.00117"), "the meter's figure, not the agent's 0");
    assert_eq!(status.attempts[0].reported_usage.as_ref().map(|u| u.total_tokens), Some(0), "the agent's claim, kept beside");
    assert!(status.attempts[0].unmeasured_pods.is_empty());
    assert_eq!(learned_runs(&admin, ns).await, Some(1), "a measured success is learned");

    let (_, pod) = started_job(&admin, &alice, &bob, ns, "silent").await;
    run_pod(&admin, ns, &pod.name_any()).await;
    meter_stopped(&admin, ns, &pod.name_any(), None).await;
    finish_pod(&admin, ns, &pod.name_any(), 0, &usage_report("gpt-4o-mini", 1_200, 0, 300, json!({"findings": 1}))).await;
    let done = wait_marked(&admin, ns, "silent", 1).await;
    assert_eq!(phase(&done), Some("Succeeded"), "the job's result is its agent's");
    let status = done.status.unwrap();
    assert_eq!(status.usage.as_ref().map(|u| u.total_tokens), Some(0), "not the agent's 1,500");
    assert_eq!(status.attempts[0].unmeasured_pods, [pod.name_any()]);
    let reported = status.conditions.iter().find(|c| c.type_ == "UsageReported").unwrap();
    assert_eq!((reported.status.as_str(), reported.reason.as_str()), ("False", "UsageUnmeasured"), "{}", reported.message);
    println!("unmeasured: {}", reported.message);
    // Marked once the operator processed it (the later event to wait for): nothing was recorded.
    assert_eq!(learned_runs(&admin, ns).await, Some(1), "an unmeasured attempt teaches the estimator nothing");
}
