//! A created Pod is expected until the Pod watch shows it (controller/pod_expectations.rs): a
//! reconcile that runs before the watch has shown a Pod the operator just created (woken by the
//! job's own status write) does not POST it again. That race is timing-dependent (~1% of `make
//! bench`'s 1,000-job burst, none in a 200-job burst here before the fix), so no test makes it
//! happen on demand: decide/tests.rs and pod_expectations.rs pin the logic, `make bench` counts
//! the 409s. What is tested here is the attack on the expectation: a tenant deleting the Pod
//! the moment it exists must hold nothing up, and get no second Pod of the deleted attempt.
//! Pod POSTs are counted by the apiserver itself (`apiserver_request_total`); this binary's only
//! test is the only client that creates Pods on its apiserver.

mod support;

use std::time::Duration;

use agentgate::api::{AgentJob, AttemptResult, Decision};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use support::cluster::*;
use support::storm;

/// Attack: whoever may delete Pods in the namespace deletes the job's Pod the moment the watch
/// shows it, before the operator may have seen it. The operator's expectation of that Pod ends
/// with the watch's events, not on a timer: the attempt fails (PodDeleted) and the retry's Pod is
/// created well before an expectation would have run out (`EXPECTATION_TTL`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_deleted_right_after_its_creation_fails_the_attempt_and_the_retry_gets_a_pod() {
    let ns = "pod-creates-deleted";
    let env = Env::builder(ns).node("deleted-node", "64", "256Gi", &[]).build().await;
    let (admin, alice, bob) = (env.admin.clone(), env.alice.clone(), env.bob.clone());
    let manifest = JobManifest::payments("scan").spec(serde_json::json!({"limits": {"maxRetries": 1}})).build();
    let job = Api::<AgentJob>::namespaced(admin.clone(), ns).create(&PostParams::default(), &manifest).await.expect("create job");
    let before = storm::pod_creates_per_apiserver(&admin).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let selector = format!("agentgate.dev/job-uid={}", job.uid().unwrap());
    let (watching, watching_rx) = tokio::sync::oneshot::channel();
    let first = {
        let pods = pods.clone();
        let mut events = watcher(pods.clone(), watcher::Config::default().labels(&selector)).boxed();
        tokio::spawn(async move {
            let mut watching = Some(watching);
            while let Some(event) = events.try_next().await.expect("watching the job's Pods") {
                match event {
                    watcher::Event::InitDone => drop(watching.take().map(|w| w.send(()))),
                    watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                        pods.delete(&pod.name_any(), &DeleteParams::default()).await.expect("delete the new Pod");
                        return pod.name_any();
                    }
                    _ => {}
                }
            }
            panic!("the Pod watch ended");
        })
    };
    // Voted once the watch is established, so that it shows the Pod as soon as it exists.
    watching_rx.await.expect("the Pod watch started");
    vote(&alice, &job, "alice", Decision::Approve).await;
    vote(&bob, &job, "bob", Decision::Approve).await;
    let deleted = first.await.expect("the deleting task");
    assert_eq!(deleted, "scan-agent-1-agentgate");

    let bound = agentgate::controller::pod_expectations::EXPECTATION_TTL.saturating_sub(Duration::from_secs(10));
    let retried = wait_for(
        "attempt 1 failed and attempt 2 running",
        bound,
        || async { Api::<AgentJob>::namespaced(admin.clone(), ns).get("scan").await.expect("get job") },
        |j: &AgentJob| j.status.as_ref().is_some_and(|s| s.attempts.len() == 2),
    )
    .await;
    let attempts = retried.status.unwrap().attempts;
    assert_eq!(attempts[0].result, AttemptResult::Failed);
    assert!(attempts[0].message.as_deref().unwrap_or_default().contains("PodDeleted"), "{:?}", attempts[0].message);
    let names = wait_for(
        "the retry's Pod",
        bound,
        || job_pods(&admin, ns, &job),
        |p: &Vec<Pod>| p.iter().any(|p| p.name_any() == "scan-agent-2-agentgate"),
    )
    .await;
    assert!(names.iter().any(|p| p.name_any() == "scan-agent-2-agentgate"));
    // The operator has acted on the deletion (attempt 2 started); the deleted attempt's Pod was
    // POSTed once, and so was the retry's: no second POST of either, refused or not.
    let creates = storm::since(&storm::pod_creates_per_apiserver(&admin).await, &before);
    assert_eq!(creates, [("201".to_string(), 2)].into(), "Pod POSTs by response code");
}
