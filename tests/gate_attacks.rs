//! Attacks on the gate itself, against the real apiserver, its admission policies and RBAC, by
//! tenants who may create Pods, ServiceAccounts, RoleBindings and AgentJobs in their namespaces
//! and read every vote's `spec.jobRef.uid` (issue 15 items 1, 3 and 4):
//! - a Pod labelled with a victim job's uid, in another namespace or under the exact name of the
//!   job's first Pod, or an attempt forged in status, must neither start the job (no agent Pod
//!   at 0/2 approvals) nor finish it (no usage or output taken from a decoy);
//! - the admission policy of deploy/admission/pods.yaml refuses such Pods from tenants (the
//!   decoys below are created by admin, as if that policy were missing: the operator holds alone);
//! - ServiceAccounts one head creates are not extra heads; a configured robot reviewer counts,
//!   at most one robot vote per job;
//! - each vote is judged with its own voterGroups; `kubectl agentgate approve` votes only on the
//!   generation the voter saw.
//!
//! "Nothing happened" is asserted only after positive evidence that the operator has seen the
//! attack: the Warning Event it sends about it, or the status it writes over a forgery.

mod support;

use std::path::Path;
use std::time::Duration;

use agentgate::api::{AgentJob, ApprovalVote, Decision};
use agentgate::domain::pod_builder::USAGE_FINALIZER;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use serde_json::json;
use support::cluster::*;
use support::controlplane::ControlPlane;

const TIMEOUT: Duration = Duration::from_secs(30);
const ROBOTS: &str = "ga-robots";
const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-agentgate");

/// The namespaces, a node and voting rights, served by one operator for every test here,
/// watching all namespaces, trusting two robot reviewers.
async fn setup(namespaces: &[&str]) -> Client {
    let robots = format!("{ROBOTS}/trusted-one,{ROBOTS}/trusted-two");
    let env = Env::builder(namespaces[0]).namespaces(&namespaces[1..]).node("gate-attacks-node", "64", "256Gi", &[]);
    env.operator(OperatorMode::Shared).args(&["--robot-voters", &robots]).build().await.admin
}

async fn user(name: &str) -> Client {
    ControlPlane::shared().client(name).await
}

/// A job created by `author` (stamped as its requester by the admission policy), one agent
/// named `agent`, so its first Pod is `<name>-agent-1`.
async fn create_job(author: &str, ns: &str, name: &str) -> AgentJob {
    create_payments_job(&user(author).await, ns, name).await
}

async fn awaiting_approval(admin: &Client, ns: &str, name: &str) -> AgentJob {
    wait_for_job(admin, ns, name, "AwaitingApproval", |j| phase(j) == Some("AwaitingApproval")).await
}

fn approval(job: &AgentJob) -> agentgate::api::ApprovalStatus {
    job.status.as_ref().and_then(|s| s.approval.clone()).unwrap_or_default()
}

/// A Pod posing as attempt 1 of `job`'s agent `agent`: its labels and generation annotation,
/// and, when `controller`, a controller ownerReference to the job.
fn decoy(name: &str, job: &AgentJob, controller: bool) -> Pod {
    let owners = if controller {
        json!([{"apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob", "name": job.name_any(),
                "uid": job.metadata.uid.clone().unwrap(), "controller": true}])
    } else {
        json!([])
    };
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "ownerReferences": owners,
            "labels": {"agentgate.dev/job-uid": job.metadata.uid.clone().unwrap(), "agentgate.dev/job": job.name_any(),
                       "agentgate.dev/agent": "agent", "agentgate.dev/attempt": "1", "app.kubernetes.io/managed-by": "agentgate"},
            "annotations": {"agentgate.dev/job-generation": "1"}},
        "spec": {"containers": [{"name": "agent", "image": "ghcr.io/mallory/agent:1"}]}}))
    .unwrap()
}

/// Creates the decoy as admin (as if the admission policy were missing) and has it "finish" with
/// a usage report and an output the job must never take.
async fn plant_decoy(admin: &Client, ns: &str, pod: &Pod) {
    Api::<Pod>::namespaced(admin.clone(), ns).create(&PostParams::default(), pod).await.expect("create decoy");
    let report = usage_report("gpt-4o-mini", 900_000, 0, 900_000, json!({"stolen": true}));
    finish_pod(admin, ns, &pod.name_any(), 0, &report).await;
}

/// Waits until the operator has visibly acted on an attack on `job`: a Warning Event on it with
/// `reason` whose note contains `fragment`, or else any move the attack aims at (an attempt,
/// usage, a phase other than AwaitingApproval, an agent Pod), so that the assertions after it
/// fail on what went wrong instead of timing out. Returns the Event, if that is what came.
async fn wait_for_reaction(admin: &Client, ns: &str, job: &AgentJob, reason: &str, fragment: &str) -> Option<Event> {
    let events: Api<Event> = Api::namespaced(admin.clone(), ns);
    let jobs: Api<AgentJob> = Api::namespaced(admin.clone(), ns);
    let name = job.name_any();
    let matching = |e: &Event| {
        e.reason.as_deref() == Some(reason)
            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
            && e.note.as_deref().is_some_and(|n| n.contains(fragment))
    };
    let (found, _, _): (Vec<Event>, AgentJob, usize) = wait_for(
        &format!("a {reason} Event on {ns}/{name} saying {fragment:?}, or the attack succeeding"),
        TIMEOUT,
        || async {
            let events = events.list(&ListParams::default()).await.expect("list events").items;
            let current = jobs.get(&name).await.expect("get job");
            let pods = operator_pods(admin, ns, job).await.len();
            (events, current, pods)
        },
        |(events, current, pods): &(Vec<Event>, AgentJob, usize)| {
            let status = current.status.clone().unwrap_or_default();
            events.iter().any(matching)
                || *pods > 0
                || phase(current) != Some("AwaitingApproval")
                || !status.attempts.is_empty()
                || status.usage.is_some()
        },
    )
    .await;
    found.into_iter().find(|e| matching(e))
}

/// The job has not moved: still awaiting approval at 0/2, no attempt, no usage, no output.
fn assert_untouched(job: &AgentJob) {
    let name = job.name_any();
    let status = job.status.as_ref().expect("a status");
    assert_eq!(phase(job), Some("AwaitingApproval"), "{name}: {status:#?}");
    assert_eq!(approval(job).summary, "0/2", "{name}");
    assert!(status.attempts.is_empty(), "{name}: attempts {:?}", status.attempts);
    assert_eq!((status.usage.as_ref(), status.output.as_ref()), (None, None), "{name}: usage or output taken from a decoy");
}

/// Pods in `ns` that the operator created for `job`: controlled by it and not the decoy.
async fn operator_pods(admin: &Client, ns: &str, job: &AgentJob) -> Vec<Pod> {
    let all = Api::<Pod>::namespaced(admin.clone(), ns).list(&ListParams::default()).await.expect("list pods").items;
    all.into_iter()
        .filter(|p| p.spec.as_ref().is_some_and(|s| s.containers[0].image.as_deref() != Some("ghcr.io/mallory/agent:1")))
        .filter(|p| p.owner_references().iter().any(|o| Some(&o.uid) == job.metadata.uid.as_ref()))
        .collect()
}

#[tokio::test]
async fn a_decoy_pod_in_another_namespace_neither_starts_nor_finishes_the_job() {
    let (ns, elsewhere) = ("ga-victim", "ga-elsewhere");
    let admin = setup(&[ns, elsewhere]).await;
    let job = create_job("dave", ns, "victim").await;
    awaiting_approval(&admin, ns, "victim").await;

    // With the victim's uid, labels and even a controller ownerReference, but in another namespace.
    plant_decoy(&admin, elsewhere, &decoy("victim-agent-1-agentgate", &job, true)).await;
    plant_decoy(&admin, elsewhere, &decoy("victim-agent-1-unowned", &job, false)).await;
    // Any tenant who may vote can wake the job: a non-head's vote, which itself never counts.
    vote(&user("erin").await, &job, "erin", Decision::Approve).await;
    let event = wait_for_reaction(&admin, ns, &job, "ForeignPodIgnored", &format!("{elsewhere}/victim-agent-1-agentgate")).await;
    eprintln!("the operator saw the decoys: {:?}", event.and_then(|e| e.note));

    let seen = Api::<AgentJob>::namespaced(admin.clone(), ns).get("victim").await.unwrap();
    assert_untouched(&seen);
    assert!(operator_pods(&admin, ns, &job).await.is_empty(), "an agent Pod was created at 0/2 approvals");
}

#[tokio::test]
async fn a_decoy_with_the_exact_pod_name_is_never_adopted() {
    let ns = "ga-squat";
    let admin = setup(&[ns]).await;

    // Labels only: not the job's Pod at all. Reported, and once approved, a name clash.
    let job = create_job("dave", ns, "squat").await;
    awaiting_approval(&admin, ns, "squat").await;
    plant_decoy(&admin, ns, &decoy("squat-agent-1-agentgate", &job, false)).await;
    vote(&user("erin").await, &job, "erin", Decision::Approve).await;
    wait_for_reaction(&admin, ns, &job, "ForeignPodIgnored", &format!("{ns}/squat-agent-1-agentgate")).await;
    assert_untouched(&Api::<AgentJob>::namespaced(admin.clone(), ns).get("squat").await.unwrap());

    vote(&user("alice").await, &job, "alice", Decision::Approve).await;
    vote(&user("bob").await, &job, "bob", Decision::Approve).await;
    let taken = wait_for_job(&admin, ns, "squat", "Ready=False PodNameTaken", |j| {
        condition(j, "Ready").is_some_and(|c| c.reason == "PodNameTaken")
    })
    .await;
    let ready = condition(&taken, "Ready").unwrap();
    assert!(ready.message.contains("Pod squat-agent-1-agentgate already exists and is not controlled by this job"), "{}", ready.message);
    let status = taken.status.as_ref().unwrap();
    assert!(status.attempts.is_empty(), "adopted the decoy: {:?}", status.attempts);
    assert_eq!((status.usage.as_ref(), status.output.as_ref()), (None, None), "took the decoy's report");
    let holder = Api::<Pod>::namespaced(admin.clone(), ns).get("squat-agent-1-agentgate").await.unwrap();
    assert!(holder.owner_references().is_empty(), "the decoy is untouched, not taken over");

    // Labels and a controller ownerReference (what only the admission policy stops): still not
    // adopted without the quorum, and nothing read from it.
    let job = create_job("dave", ns, "squat2").await;
    awaiting_approval(&admin, ns, "squat2").await;
    plant_decoy(&admin, ns, &decoy("squat2-agent-1-agentgate", &job, true)).await;
    wait_for_reaction(&admin, ns, &job, "UnapprovedPodsIgnored", "squat2-agent-1-agentgate").await;
    assert_untouched(&Api::<AgentJob>::namespaced(admin.clone(), ns).get("squat2").await.unwrap());
    assert!(operator_pods(&admin, ns, &job).await.is_empty(), "an agent Pod was created at 0/2 approvals");
}

#[tokio::test]
async fn a_forged_status_attempt_starts_nothing() {
    let ns = "ga-forged";
    let admin = setup(&[ns]).await;
    // erin may write job status in this namespace (and nothing else of agentgate's).
    grant_status_writing(&admin, ns, "erin").await;

    let job = create_job("dave", ns, "forged").await;
    awaiting_approval(&admin, ns, "forged").await;
    // The forged attempt names a Pod that exists, though not the job's: it proves nothing either.
    plant_decoy(&admin, ns, &decoy("forged-agent-1-agentgate", &job, false)).await;
    let forged = json!({"status": {"phase": "Running",
        "approval": {"required": 2, "approved": 2, "summary": "2/2"},
        "attempts": [{"attempt": 1, "generation": 1, "pods": ["forged-agent-1-agentgate"], "result": "Running",
                      "startTime": "2026-01-01T00:00:00Z"}]}});
    Api::<AgentJob>::namespaced(user("erin").await, ns)
        .patch_status("forged", &PatchParams::default(), &Patch::Merge(&forged))
        .await
        .expect("erin may write status");

    // The forgery itself moved the job; what counts is whether the operator undoes it or acts on it.
    let jobs = Api::<AgentJob>::namespaced(admin.clone(), ns);
    let (rewritten, _) = wait_for(
        "the operator to act on the forged attempt: dropped, its Pods created, or the job moved on",
        TIMEOUT,
        || async { (jobs.get("forged").await.unwrap(), operator_pods(&admin, ns, &job).await.len()) },
        |(j, pods): &(AgentJob, usize)| *pods > 0 || phase(j) != Some("Running"),
    )
    .await;
    let events = Api::<Event>::namespaced(admin.clone(), ns).list(&ListParams::default()).await.unwrap().items;
    let said = |e: &Event| {
        e.reason.as_deref() == Some("UnprovenAttemptIgnored")
            && e.note.as_deref().is_some_and(|n| n.contains("status recorded attempt 1 (generation 1)"))
    };
    // Events are sent in the background: wait for it only once the status shows the drop.
    if !events.iter().any(said) && operator_pods(&admin, ns, &job).await.is_empty() {
        wait_for_reaction(&admin, ns, &job, "UnprovenAttemptIgnored", "status recorded attempt 1 (generation 1)").await;
    }
    assert_untouched(&rewritten);
    let pods = Api::<Pod>::namespaced(admin.clone(), ns).list(&ListParams::default()).await.unwrap().items;
    let names: Vec<_> = pods.iter().map(|p| p.name_any()).collect();
    assert_eq!(names, ["forged-agent-1-agentgate"], "Pods created for a forged attempt");
    assert!(operator_pods(&admin, ns, &job).await.is_empty());
}

/// A running attempt belongs to the generation its votes approved. Its author then adds an agent
/// of their own (generation 2, which nobody approved): following attempt 1, the operator must
/// not build the new agent's Pod from the new spec and run it as part of the approved attempt.
#[tokio::test]
async fn an_agent_added_while_an_attempt_runs_gets_no_pod() {
    let ns = "ga-added-agent";
    let admin = setup(&[ns]).await;
    let job = create_job("dave", ns, "grows").await;
    vote(&user("alice").await, &job, "alice", Decision::Approve).await;
    vote(&user("bob").await, &job, "bob", Decision::Approve).await;
    wait_for_job(&admin, ns, "grows", "Running", |j| phase(j) == Some("Running")).await;
    let first: Vec<_> = operator_pods(&admin, ns, &job).await.iter().map(|p| p.name_any()).collect();
    assert_eq!(first, ["grows-agent-1-agentgate"]);

    let extra =
        json!({"spec": {"agents": {"supporting": [{"name": "extra", "image": "ghcr.io/dave/unreviewed:1", "model": "gpt-4o-mini"}]}}});
    let grown = Api::<AgentJob>::namespaced(user("dave").await, ns)
        .patch("grows", &PatchParams::default(), &Patch::Merge(&extra))
        .await
        .expect("dave edits his job");
    assert_eq!(grown.metadata.generation, Some(2));
    // The operator has followed attempt 1 on generation 2 (the Pods are made before that status
    // is written).
    wait_for_job(&admin, ns, "grows", "SpecChangePending on generation 2", |j| {
        condition(j, "SpecChangePending")
            .is_some_and(|c| c.status == "True" && c.message.contains("generation 2 applies from the next attempt"))
    })
    .await;
    let pods = Api::<Pod>::namespaced(admin.clone(), ns).list(&ListParams::default()).await.unwrap().items;
    let names: Vec<_> = pods.iter().map(|p| p.name_any()).collect();
    assert_eq!(names, ["grows-agent-1-agentgate"], "a Pod was built from generation 2, which nobody approved");
}

#[tokio::test]
async fn a_forged_estimate_skips_no_check() {
    let ns = "ga-forged-estimate";
    let admin = setup(&[ns]).await;
    grant_status_writing(&admin, ns, "erin").await;
    // Over its budget: rejected at once.
    let job = agent_job(
        "pricey",
        json!({"category": "payments",
               "agents": {"primary": {"name": "agent", "image": "ghcr.io/acme/agent:1", "model": "gpt-4o-mini"}},
               "resources": {"cpu": "100m", "memory": "128Mi"}, "budget": {"maxCostUSD": "0.000001"}}),
        json!({}),
    );
    let job = Api::<AgentJob>::namespaced(user("dave").await, ns).create(&PostParams::default(), &job).await.unwrap();
    wait_for_job(&admin, ns, "pricey", "BudgetExceeded", |j| phase(j) == Some("Rejected")).await;

    // erin rewrites status as if generation 1 had been estimated at $0 and awaited approval.
    let forged = json!({"status": {"phase": "AwaitingApproval", "conditions": [],
        "estimate": {"generation": 1, "tokens": {"p50": 1, "p90": 1}, "costUSD": {"p50": "0", "p90": "0"}, "method": "prior", "samples": 0}}});
    Api::<AgentJob>::namespaced(user("erin").await, ns)
        .patch_status("pricey", &PatchParams::default(), &Patch::Merge(&forged))
        .await
        .expect("erin may write status");
    vote(&user("alice").await, &job, "alice", Decision::Approve).await;
    vote(&user("bob").await, &job, "bob", Decision::Approve).await;
    let jobs = Api::<AgentJob>::namespaced(admin.clone(), ns);
    let (seen, pods) = wait_for(
        "the approved job rejected again, or started",
        TIMEOUT,
        || async { (jobs.get("pricey").await.unwrap(), operator_pods(&admin, ns, &job).await.len()) },
        |(j, pods): &(AgentJob, usize)| *pods > 0 || phase(j) == Some("Running") || approval(j).approved == 2,
    )
    .await;
    assert_eq!(pods, 0, "an agent Pod started on a forged estimate");
    assert_eq!(phase(&seen), Some("Rejected"), "{:#?}", seen.status);
    let ready = condition(&seen, "Ready").unwrap();
    assert_eq!(ready.reason, "BudgetExceeded", "{}", ready.message);
}

#[tokio::test]
async fn the_admission_policy_refuses_labelled_pods_from_tenants() {
    let ns = "ga-vap";
    let admin = setup(&[ns]).await;
    let job = create_job("dave", ns, "target").await;
    // dave may create and change Pods in his namespace, as tenants may.
    let pp = PatchParams::apply("gate-attacks").force();
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "pod-author", "namespace": ns},
        "rules": [{"apiGroups": [""], "resources": ["pods", "pods/ephemeralcontainers"], "verbs": ["create", "get", "update", "patch", "delete"]}]});
    Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(admin.clone(), ns).patch("pod-author", &pp, &Patch::Apply(&role)).await.unwrap();
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "dave-authors-pods", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-author"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "dave"}]});
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), ns)
        .patch("dave-authors-pods", &pp, &Patch::Apply(&binding))
        .await
        .unwrap();
    let as_dave = Api::<Pod>::namespaced(user("dave").await, ns);
    let dry_run = PostParams { dry_run: true, ..PostParams::default() };
    let refused = |r: &Result<Pod, kube::Error>| matches!(r, Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("only the agentgate operator may create or change agent Pods"));

    // The policy loads asynchronously after it is applied: wait until it acts.
    let labelled = decoy("target-agent-1", &job, false);
    let first = wait_for("the agent-Pod policy to refuse dave", TIMEOUT, || as_dave.create(&dry_run, &labelled), refused).await;
    eprintln!("refused: {first:?}");
    // An AgentJob ownerReference without the labels is refused too.
    let mut owned = decoy("target-agent-1", &job, true);
    owned.metadata.labels = None;
    assert!(refused(&as_dave.create(&dry_run, &owned).await), "an AgentJob-owned Pod by a tenant must be refused");
    // A Pod of his own is fine; labelling it afterwards is not.
    let mut plain = decoy("plain", &job, false);
    plain.metadata.labels = Some([("app".to_string(), "mine".to_string())].into());
    plain.metadata.annotations = None;
    as_dave.create(&PostParams::default(), &plain).await.expect("an unlabelled Pod is the tenant's business");
    let relabel = as_dave
        .patch(
            "plain",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"agentgate.dev/job-uid": job.metadata.uid.clone().unwrap()}}})),
        )
        .await;
    assert!(refused(&relabel), "adding the job's uid label must be refused: {relabel:?}");
    // Whoever holds the operator's right (here admin, a cluster admin) may.
    Api::<Pod>::namespaced(admin.clone(), ns).create(&dry_run, &labelled).await.expect("the operator's right passes");
    // On an agent Pod (made by admin here, as the operator would), the tenant may still change
    // what is his business, such as an annotation, but not the image an approval was given for.
    let mut agent = decoy("target-agent-2", &job, true);
    agent.metadata.finalizers = Some(vec![USAGE_FINALIZER.to_string()]);
    Api::<Pod>::namespaced(admin.clone(), ns).create(&PostParams::default(), &agent).await.expect("admin makes an agent Pod");
    let annotate = Api::<Pod>::namespaced(user("dave").await, ns)
        .patch("target-agent-2", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {"note": "mine"}}})))
        .await;
    assert!(annotate.is_ok(), "an update keeping the claim and the images passes: {annotate:?}");
    let swap = Api::<Pod>::namespaced(user("dave").await, ns)
        .patch(
            "target-agent-2",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"containers": [{"name": "agent", "image": "ghcr.io/mallory/evil:1"}]}})),
        )
        .await;
    assert!(refused(&swap), "swapping an agent Pod's image must be refused: {swap:?}");
    // Nor may he strip a label the operator reads the Pod by: without its attempt (or agent)
    // label, an agent Pod his job still controls was no Pod of the job's, so its report and
    // usage were never read and its attempt stayed Running, holding its tools' capacity. Nor
    // change the generation the Pod says it was built from (read to adopt an unrecorded attempt).
    for (what, patch) in [
        ("removing the attempt label", json!({"metadata": {"labels": {"agentgate.dev/attempt": null}}})),
        ("removing the agent label", json!({"metadata": {"labels": {"agentgate.dev/agent": null}}})),
        ("changing the job-generation annotation", json!({"metadata": {"annotations": {"agentgate.dev/job-generation": "7"}}})),
        ("removing the job-generation annotation", json!({"metadata": {"annotations": {"agentgate.dev/job-generation": null}}})),
        // Nor drop the finalizer that keeps a deleted agent Pod until its meter's last message
        // is read: deleted without it, the Pod vanished with the usage its meter had not reported.
        ("removing the usage-tracking finalizer", json!({"metadata": {"finalizers": null}})),
    ] {
        let before = as_dave.get("target-agent-2").await.expect("the agent Pod");
        assert!(before.finalizers().iter().any(|f| f == USAGE_FINALIZER), "the Pod still holds the finalizer before {what}");
        let strip = as_dave.patch("target-agent-2", &PatchParams::default(), &Patch::Merge(patch)).await;
        assert!(refused(&strip), "{what} of an agent Pod must be refused: {strip:?}");
    }
    // His own label on it still passes, after all of that was refused.
    let own =
        as_dave.patch("target-agent-2", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"team": "dave"}}}))).await;
    assert!(own.is_ok(), "a label of the tenant's own on an agent Pod passes: {own:?}");
    let debug = as_dave
        .patch_ephemeral_containers(
            "target-agent-2",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"spec": {"ephemeralContainers": [{"name": "debugger", "image": "busybox", "targetContainerName": "agent"}]}}),
            ),
        )
        .await;
    assert!(refused(&debug), "an ephemeral container in an agent Pod must be refused: {debug:?}");
    // The operator's right (admin here) lets the finalizer go.
    Api::<Pod>::namespaced(admin.clone(), ns)
        .patch("target-agent-2", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}})))
        .await
        .expect("the operator's right may release the finalizer");
    Api::<Pod>::namespaced(admin.clone(), ns).delete("target-agent-2", &DeleteParams::default()).await.unwrap();
    Api::<Pod>::namespaced(admin.clone(), ns).delete("plain", &DeleteParams::default()).await.unwrap();
}

/// Binds `user` in `ns` to what `edit` aggregates (this control plane runs no controller-manager
/// to aggregate `edit` itself): the ordinary rights of a tenant in their namespace.
async fn grant_edit(admin: &Client, ns: &str, user: &str) {
    let pp = PatchParams::apply("gate-attacks").force();
    for role in ["system:aggregate-to-view", "system:aggregate-to-edit"] {
        let name = format!("{user}-{}", role.trim_start_matches("system:"));
        let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name, "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]});
        Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), ns)
            .patch(&name, &pp, &Patch::Apply(&binding))
            .await
            .unwrap();
    }
}

/// The uid of the AgentJob that controls the Pod, if any.
fn controller_uid(pod: &Pod) -> Option<String> {
    pod.owner_references().iter().find(|o| o.controller == Some(true) && o.kind == "AgentJob").map(|o| o.uid.clone())
}

/// A tenant with `edit` removes the AgentJob ownerReference from their running agent Pod, which
/// the admission policy lets pass (the garbage collector does exactly that on an orphaning
/// delete). Before the fix the job took the Pod for deleted: attempt 1 failed `PodDeleted`, the
/// orphan sweep released the Pod's usage finalizer, and attempt 2 started beside a Pod that kept
/// running with its meter, which the meter API now refused (`not_an_agent_pod`): outside the
/// operator's control, holding its node and tools, its usage never read. Now the job takes its
/// Pod back (the Pod is provably the operator's: only it makes Pods with the job's labels and
/// nobody may remove them), the attempt goes on, and its usage is read when it ends. Decoys are
/// left alone: a Pod with the job's labels and the finalizer in another namespace, and one here
/// without the finalizer (both made by admin, as if the policy were missing).
#[tokio::test]
async fn an_agent_pod_stripped_of_its_owner_is_taken_back_not_left_running_beside_a_retry() {
    let (ns, elsewhere) = ("ga-unowned", "ga-unowned-elsewhere");
    let admin = setup(&[ns, elsewhere]).await;
    grant_edit(&admin, ns, "dave").await;
    let dave = user("dave").await;
    let manifest = JobManifest::payments("loose").spec(json!({"limits": {"maxRetries": 2}})).build();
    let job = Api::<AgentJob>::namespaced(dave.clone(), ns).create(&PostParams::default(), &manifest).await.expect("dave creates his job");
    let uid = job.metadata.uid.clone().unwrap();
    vote(&user("alice").await, &job, "alice", Decision::Approve).await;
    vote(&user("bob").await, &job, "bob", Decision::Approve).await;
    wait_for_job(&admin, ns, "loose", "Running", |j| phase(j) == Some("Running")).await;
    let first: Vec<_> = operator_pods(&admin, ns, &job).await.iter().map(|p| p.name_any()).collect();
    assert_eq!(first, ["loose-agent-1-agentgate"]);
    let pod = first[0].clone();
    run_pod(&admin, ns, &pod).await;

    let mut far = decoy("loose-agent-1-agentgate", &job, false);
    far.metadata.finalizers = Some(vec![USAGE_FINALIZER.to_string()]);
    Api::<Pod>::namespaced(admin.clone(), elsewhere).create(&PostParams::default(), &far).await.expect("a decoy elsewhere");
    Api::<Pod>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &decoy("loose-agent-1", &job, false))
        .await
        .expect("a decoy here");

    // The tenant's patch passes admission (once the authorizer has his binding).
    let as_dave = Api::<Pod>::namespaced(dave.clone(), ns);
    let strip = json!([{"op": "remove", "path": "/metadata/ownerReferences"}]);
    let stripped = wait_for(
        "dave's removal of the ownerReference",
        TIMEOUT,
        || {
            let (as_dave, pod, strip) = (as_dave.clone(), pod.clone(), strip.clone());
            async move { as_dave.patch(&pod, &PatchParams::default(), &Patch::<()>::Json(serde_json::from_value(strip).unwrap())).await }
        },
        |r: &Result<Pod, kube::Error>| !matches!(r, Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("cannot patch")),
    )
    .await
    .expect("admission lets an owner's removal pass");
    assert!(controller_uid(&stripped).is_none(), "{:?}", stripped.metadata.owner_references);

    // Evidence the operator acted: the owner back, or the job moving on without the Pod.
    let jobs = Api::<AgentJob>::namespaced(admin.clone(), ns);
    let pods = Api::<Pod>::namespaced(admin.clone(), ns);
    let (seen, current) = wait_for(
        "the operator to act on the Pod stripped of its owner",
        TIMEOUT,
        || async { (jobs.get("loose").await.unwrap(), pods.get_opt(&pod).await.unwrap()) },
        |(j, p): &(AgentJob, Option<Pod>)| {
            let attempts = j.status.as_ref().map(|s| s.attempts.clone()).unwrap_or_default();
            p.as_ref().is_none_or(|p| controller_uid(p).is_some() || !p.finalizers().iter().any(|f| f == USAGE_FINALIZER))
                || attempts.len() != 1
                || attempts[0].result != agentgate::api::AttemptResult::Running
        },
    )
    .await;
    let status = seen.status.clone().unwrap();
    let attempts: Vec<_> = status.attempts.iter().map(|a| (a.attempt, a.result, a.message.clone())).collect();
    let now: Vec<_> = operator_pods(&admin, ns, &job).await.iter().map(|p| p.name_any()).collect();
    let current = current.expect("the stripped Pod still exists");
    eprintln!(
        "after the owner was stripped: attempts {attempts:?}, Pods the job controls {now:?}, stripped Pod owned by {:?}, finalizers {:?}",
        current.owner_references().iter().map(|o| &o.uid).collect::<Vec<_>>(),
        current.finalizers()
    );
    assert_eq!(controller_uid(&current).as_deref(), Some(uid.as_str()), "the job takes its Pod back");
    assert!(current.finalizers().iter().any(|f| f == USAGE_FINALIZER), "its usage finalizer is kept");
    assert_eq!(attempts.len(), 1, "no second attempt beside the first: {attempts:?}");
    assert_eq!(attempts[0].1, agentgate::api::AttemptResult::Running, "{attempts:?}");
    assert_eq!(now, std::slice::from_ref(&pod), "one agent Pod, the first");
    wait_for_reaction(&admin, ns, &job, "PodOwnerRestored", &pod).await.expect("a PodOwnerRestored Event names the Pod");

    // The attempt ends as any other: its usage and output are read from the Pod.
    finish_pod(&admin, ns, &pod, 0, &usage_report("gpt-4o-mini", 1200, 0, 300, json!({"done": true}))).await;
    let done = wait_for_job(&admin, ns, "loose", "Succeeded", |j| phase(j).is_some_and(|p| p != "Running")).await;
    assert_eq!(phase(&done), Some("Succeeded"), "{:#?}", done.status);
    let status = done.status.unwrap();
    assert_eq!((status.attempts.len(), status.usage.as_ref().map(|u| u.total_tokens)), (1, Some(1500)), "its usage counted");

    // The decoys: untouched, neither taken nor deleted.
    let far = Api::<Pod>::namespaced(admin.clone(), elsewhere).get("loose-agent-1-agentgate").await.expect("the decoy elsewhere stays");
    assert!(far.owner_references().is_empty(), "the decoy elsewhere is not taken: {:?}", far.owner_references());
    let near = pods.get("loose-agent-1").await.expect("the decoy without the finalizer stays");
    assert!(near.owner_references().is_empty(), "the decoy without the finalizer is not taken: {:?}", near.owner_references());
    let release = json!({"metadata": {"finalizers": null}});
    Api::<Pod>::namespaced(admin.clone(), elsewhere)
        .patch("loose-agent-1-agentgate", &PatchParams::default(), &Patch::Merge(release))
        .await
        .unwrap();
    Api::<Pod>::namespaced(admin.clone(), elsewhere).delete("loose-agent-1-agentgate", &DeleteParams::default()).await.unwrap();
    pods.delete("loose-agent-1", &DeleteParams::default()).await.unwrap();
}

/// A client authenticating as ServiceAccount `ns/name` (created if needed).
async fn service_account_client(admin: &Client, ns: &str, name: &str) -> Client {
    let cp = ControlPlane::shared();
    let sa: k8s_openapi::api::core::v1::ServiceAccount =
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})).unwrap();
    match Api::namespaced(admin.clone(), ns).create(&PostParams::default(), &sa).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating ServiceAccount {name}: {e}"),
    }
    let out = cp.kubectl("admin", &["create", "token", name, "-n", ns, "--duration=1h"]);
    assert!(out.status.success(), "kubectl create token: {}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    client_for(&cp.token_kubeconfig(&format!("sa-{ns}-{name}"), &token, ns)).await
}

async fn client_for(kubeconfig: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    Client::try_from(config).unwrap()
}

/// A vote named `name` by `client`'s user `voter` on the job's current generation.
async fn vote_as(client: &Client, job: &AgentJob, name: &str, voter: &str) {
    let vote: ApprovalVote = serde_json::from_value(json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "ApprovalVote",
        "metadata": {"name": name},
        "spec": {"jobRef": {"name": job.name_any(), "uid": job.metadata.uid.clone().unwrap(), "generation": job.metadata.generation.unwrap()},
                 "voter": voter, "decision": "Approve"}}))
    .unwrap();
    Api::<ApprovalVote>::namespaced(client.clone(), &job.namespace().unwrap())
        .create(&PostParams::default(), &vote)
        .await
        .unwrap_or_else(|e| panic!("{voter} votes {name}: {e}"));
}

#[tokio::test]
async fn service_accounts_one_head_makes_are_not_more_heads() {
    let admin = setup(&[ROBOTS]).await;
    // A head who may create ServiceAccounts and RoleBindings here makes two "sock puppets" and
    // binds them as voters and heads; the operator trusts two other accounts as robot reviewers.
    let accounts = ["sock-one", "sock-two", "trusted-one", "trusted-two"];
    let mut clients = Vec::new();
    for account in accounts {
        clients.push(service_account_client(&admin, ROBOTS, account).await);
    }
    bind_service_accounts_as_heads(&admin, ROBOTS, "robots", &accounts).await;
    let sa = |name: &str| format!("system:serviceaccount:{ROBOTS}:{name}");

    // Two untrusted ServiceAccounts: 0/2, each listed as not counted, with why.
    let socks = create_job("dave", ROBOTS, "socks").await;
    vote_as(&clients[0], &socks, "socks-one", &sa("sock-one")).await;
    vote_as(&clients[1], &socks, "socks-two", &sa("sock-two")).await;
    let seen = wait_for_job(&admin, ROBOTS, "socks", "both sock votes judged", |j| {
        approval(j).ignored_votes.len() as i32 + approval(j).approved == 2
    })
    .await;
    assert_eq!((phase(&seen), approval(&seen).summary.as_str()), (Some("AwaitingApproval"), "0/2"));
    for ignored in &approval(&seen).ignored_votes {
        assert!(ignored.why.contains("is not a trusted robot voter"), "{}: {}", ignored.name, ignored.why);
    }

    // A configured robot reviewer and one human head: approved.
    let reviewed = create_job("dave", ROBOTS, "reviewed").await;
    vote_as(&clients[2], &reviewed, "reviewed-robot", &sa("trusted-one")).await;
    vote(&user("alice").await, &reviewed, "alice", Decision::Approve).await;
    let approved = wait_for_job(&admin, ROBOTS, "reviewed", "2/2", |j| approval(j).approved == 2).await;
    let voters: Vec<_> = approval(&approved).approvers.iter().map(|a| a.voter.clone()).collect();
    assert!(voters.contains(&sa("trusted-one")) && voters.contains(&"alice".to_string()), "{voters:?}");

    // Two trusted robots are still one robot vote.
    let robots = create_job("dave", ROBOTS, "robots").await;
    vote_as(&clients[2], &robots, "robots-one", &sa("trusted-one")).await;
    wait_for_job(&admin, ROBOTS, "robots", "the first robot counted", |j| approval(j).approved == 1).await;
    vote_as(&clients[3], &robots, "robots-two", &sa("trusted-two")).await;
    let seen = wait_for_job(&admin, ROBOTS, "robots", "the second robot judged", |j| {
        approval(j).ignored_votes.iter().any(|v| v.name == "robots-two") || approval(j).approved == 2
    })
    .await;
    assert_eq!((phase(&seen), approval(&seen).summary.as_str()), (Some("AwaitingApproval"), "1/2"));
    let why = approval(&seen).ignored_votes.into_iter().find(|v| v.name == "robots-two").unwrap().why;
    assert!(why.contains("1 robot vote(s) already count on this job") && why.contains("--max-robot-votes 1"), "{why}");
}

/// A trusted robot's vote is cast by whoever may act as its ServiceAccount (here: impersonate it;
/// minting its tokens or running a Pod as it does the same). Were that the job's author, they would
/// approve their own job; were it another voter, one person would make two of its approvals. The
/// robot voting with its own token still counts.
#[tokio::test]
async fn a_robot_vote_cast_by_the_author_or_another_voter_does_not_count() {
    let admin = setup(&[ROBOTS]).await;
    let robot_client = service_account_client(&admin, ROBOTS, "trusted-one").await;
    let robot = format!("system:serviceaccount:{ROBOTS}:trusted-one");
    let pp = PatchParams::apply("gate-attacks").force();
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "robot-actor", "namespace": ROBOTS},
        "rules": [{"apiGroups": [""], "resources": ["serviceaccounts"], "resourceNames": ["trusted-one"], "verbs": ["impersonate"]}]});
    Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(admin.clone(), ROBOTS)
        .patch("robot-actor", &pp, &Patch::Apply(&role))
        .await
        .unwrap();
    let person = |name: &str| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": name});
    let robot_subject = json!({"kind": "ServiceAccount", "name": "trusted-one", "namespace": ROBOTS});
    let bindings = [
        ("actas-robot-vote", "ClusterRole", "test-agentgate-voter", vec![robot_subject.clone()]),
        ("actas-robot-head", "ClusterRole", "test-agentgate-head-of-every-category", vec![robot_subject]),
        ("robot-actors", "Role", "robot-actor", vec![person("erin"), person("bob")]),
    ];
    for (name, kind, role, subjects) in bindings {
        let object = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name, "namespace": ROBOTS},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role}, "subjects": subjects});
        Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), ROBOTS)
            .patch(name, &pp, &Patch::Apply(&object))
            .await
            .unwrap();
    }
    let tallied = |name: &'static str| {
        let admin = admin.clone();
        async move {
            wait_for_job(&admin, ROBOTS, name, "both votes judged", |j| approval(j).ignored_votes.len() as i32 + approval(j).approved == 2)
                .await
        }
    };

    // erin writes a job and approves it as the robot; alice approves: one review, not two.
    let own = create_job("erin", ROBOTS, "robot-of-the-author").await;
    vote_as(&impersonating("erin", &robot).await, &own, "own-robot", &robot).await;
    vote(&user("alice").await, &own, "alice", Decision::Approve).await;
    let seen = tallied("robot-of-the-author").await;
    assert_eq!((phase(&seen), approval(&seen).summary.as_str()), (Some("AwaitingApproval"), "1/2"), "erin approved her own job as {robot}");
    let why = approval(&seen).ignored_votes.into_iter().find(|v| v.name == "own-robot").unwrap().why;
    assert!(why.contains(&format!("erin, who created this job's spec, may act as {robot}")), "{why}");

    // bob approves dave's job himself and again as the robot.
    let twice = create_job("dave", ROBOTS, "robot-of-a-voter").await;
    vote(&user("bob").await, &twice, "bob", Decision::Approve).await;
    vote_as(&impersonating("bob", &robot).await, &twice, "twice-robot", &robot).await;
    let seen = tallied("robot-of-a-voter").await;
    assert_eq!((phase(&seen), approval(&seen).summary.as_str()), (Some("AwaitingApproval"), "1/2"), "bob approved twice");
    let why = approval(&seen).ignored_votes.into_iter().find(|v| v.name == "twice-robot").unwrap().why;
    assert!(why.contains(&format!("bob, who also voted on it, may act as {robot}")), "{why}");

    // The robot itself, with a human head nobody else voted as: approved.
    let honest = create_job("dave", ROBOTS, "robot-itself").await;
    vote_as(&robot_client, &honest, "honest-robot", &robot).await;
    vote(&user("alice").await, &honest, "alice", Decision::Approve).await;
    let approved = wait_for_job(&admin, ROBOTS, "robot-itself", "2/2", |j| approval(j).approved == 2).await;
    assert_ne!(phase(&approved), Some("AwaitingApproval"));
}

/// The same through a group: RBAC lets a group carol belongs to (agentgate:humans) impersonate
/// the trusted robot, as clusters commonly grant rights to their identity provider's groups.
/// The operator asked whether carol, as a bare username, may act as the robot: no, so her job,
/// approved by herself as the robot and by alice, ran. Admission now records each writer's
/// groups (`agentgate.dev/writer-groups`), and the question is asked with them.
#[tokio::test]
async fn a_robot_vote_cast_by_the_author_through_her_group_does_not_count() {
    let admin = setup(&[ROBOTS]).await;
    service_account_client(&admin, ROBOTS, "trusted-two").await;
    let robot = format!("system:serviceaccount:{ROBOTS}:trusted-two");
    let pp = PatchParams::apply("gate-attacks").force();
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "robot-two-actor", "namespace": ROBOTS},
        "rules": [{"apiGroups": [""], "resources": ["serviceaccounts"], "resourceNames": ["trusted-two"], "verbs": ["impersonate"]}]});
    Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(admin.clone(), ROBOTS)
        .patch("robot-two-actor", &pp, &Patch::Apply(&role))
        .await
        .unwrap();
    let robot_subject = json!({"kind": "ServiceAccount", "name": "trusted-two", "namespace": ROBOTS});
    let group = json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "agentgate:humans"});
    let bindings = [
        ("group-robot-vote", "ClusterRole", "test-agentgate-voter", robot_subject.clone()),
        ("group-robot-head", "ClusterRole", "test-agentgate-head-of-every-category", robot_subject),
        ("group-robot-actors", "Role", "robot-two-actor", group),
    ];
    for (name, kind, role, subject) in bindings {
        let object = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name, "namespace": ROBOTS},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role}, "subjects": [subject]});
        Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), ROBOTS)
            .patch(name, &pp, &Patch::Apply(&object))
            .await
            .unwrap();
    }
    let own = create_job("carol", ROBOTS, "robot-of-the-authors-group").await;
    vote_as(&impersonating("carol", &robot).await, &own, "group-robot", &robot).await;
    vote(&user("alice").await, &own, "alice", Decision::Approve).await;
    let seen = wait_for_job(&admin, ROBOTS, "robot-of-the-authors-group", "both votes judged", |j| {
        approval(j).ignored_votes.len() as i32 + approval(j).approved == 2
    })
    .await;
    assert_eq!(
        (phase(&seen), approval(&seen).summary.as_str()),
        (Some("AwaitingApproval"), "1/2"),
        "carol approved her own job as {robot}"
    );
    let why = approval(&seen).ignored_votes.into_iter().find(|v| v.name == "group-robot").unwrap().why;
    assert!(why.contains(&format!("carol, who created this job's spec, may act as {robot}")), "{why}");
    // What a client writes there is replaced: carol cannot claim to be in no group.
    let forged = json!({"metadata": {"annotations": {"agentgate.dev/writer-groups": "carol\tsystem:authenticated"}}});
    let patched = Api::<AgentJob>::namespaced(user("carol").await, ROBOTS)
        .patch("robot-of-the-authors-group", &PatchParams::default(), &Patch::Merge(&forged))
        .await
        .unwrap();
    let recorded = patched.annotations().get("agentgate.dev/writer-groups").cloned().unwrap_or_default();
    assert!(recorded.split('\n').next().is_some_and(|line| line.split('\t').any(|g| g == "agentgate:humans")), "{recorded:?}");
}

/// Creates a vote as admin impersonating `voter` with exactly `groups` (kubectl --as), so the
/// admission policy stamps those groups on it.
fn vote_impersonating(job: &AgentJob, name: &str, voter: &str, groups: &[&str]) {
    let cp = ControlPlane::shared();
    let vote = json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "ApprovalVote", "metadata": {"name": name},
        "spec": {"jobRef": {"name": job.name_any(), "uid": job.metadata.uid.clone().unwrap(), "generation": 1},
                 "voter": voter, "decision": "Approve"}});
    let file = cp.dir().join(format!("vote-{name}.json"));
    std::fs::write(&file, vote.to_string()).unwrap();
    let file = file.to_str().unwrap().to_string();
    let ns = job.namespace().unwrap();
    let mut args = vec!["create", "-n", ns.as_str(), "-f", file.as_str(), "--as", voter];
    for group in groups {
        args.extend(["--as-group", *group]);
    }
    let out = cp.kubectl("admin", &args);
    assert!(out.status.success(), "creating vote {name} as {voter}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn each_vote_is_checked_with_its_own_groups() {
    let ns = "ga-groups";
    let admin = setup(&[ns]).await;
    // frank was a head (through a group) when he approved the first job named ledger.
    let first = create_job("dave", ns, "ledger").await;
    vote_impersonating(&first, "ledger-frank-old", "frank", &["agentgate:users", "agentgate:heads", "system:authenticated"]);
    wait_for_job(&admin, ns, "ledger", "frank counted as a head", |j| approval(j).approved == 1).await;
    let jobs = Api::<AgentJob>::namespaced(admin.clone(), ns);
    jobs.delete("ledger", &DeleteParams::default()).await.unwrap();
    wait_for("the first ledger gone", TIMEOUT, || async { jobs.get_opt("ledger").await.unwrap() }, |j| j.is_none()).await;

    // The job is created again; frank, no longer in the heads' group, approves it, and so does bob.
    // His stale vote (on the deleted job) must not vouch for the new one.
    let second = create_job("dave", ns, "ledger").await;
    vote_impersonating(&second, "ledger-frank-new", "frank", &["agentgate:users", "system:authenticated"]);
    vote(&user("bob").await, &second, "bob", Decision::Approve).await;
    let judged = |j: &AgentJob, vote: &str| {
        approval(j).ignored_votes.iter().any(|v| v.name == vote) || approval(j).approvers.iter().any(|a| a.vote == vote)
    };
    let seen = wait_for_job(&admin, ns, "ledger", "frank's and bob's votes judged", |j| {
        judged(j, "ledger-frank-new") && approval(j).approvers.iter().any(|a| a.voter == "bob")
    })
    .await;
    let why = approval(&seen)
        .ignored_votes
        .into_iter()
        .find(|v| v.name == "ledger-frank-new")
        .unwrap_or_else(|| panic!("frank's new vote counted on the strength of his stale one: {:?}", approval(&seen)))
        .why;
    assert!(why.contains("frank is not a head of category payments"), "{why}");
    assert_eq!((phase(&seen), approval(&seen).summary.as_str()), (Some("AwaitingApproval"), "1/2"));
}

async fn plugin(user: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(PLUGIN)
        .args(args)
        .env("KUBECONFIG", ControlPlane::shared().kubeconfig(user))
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("running kubectl-agentgate")
}

#[tokio::test]
async fn the_plugin_votes_only_on_the_generation_the_voter_saw() {
    let ns = "ga-plugin";
    let admin = setup(&[ns]).await;
    let job = create_job("dave", ns, "report").await;
    awaiting_approval(&admin, ns, "report").await;
    // alice reviewed generation 1; dave raises the budget before she votes.
    Api::<AgentJob>::namespaced(user("dave").await, ns)
        .patch("report", &PatchParams::default(), &Patch::Merge(json!({"spec": {"budget": {"maxCostUSD": "50"}}})))
        .await
        .unwrap();
    let stale = plugin("alice", &["approve", "report", "-n", ns, "--generation", "1"]).await;
    let err = String::from_utf8_lossy(&stale.stderr);
    assert!(!stale.status.success(), "a vote on a generation alice did not review must fail");
    assert!(err.contains("report is at generation 2, not the generation 1 you reviewed"), "{err}");
    let votes = Api::<ApprovalVote>::namespaced(admin.clone(), ns);
    assert!(votes.list(&ListParams::default()).await.unwrap().items.is_empty(), "no vote may be created");

    // Voting on what is shown: the generation and the spec are printed, and the vote names them.
    let ok = plugin("alice", &["approve", "report", "-n", ns, "--generation", "2"]).await;
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{out}\n{}", String::from_utf8_lossy(&ok.stderr));
    assert!(out.contains(&format!("Approve {ns}/report generation 2 (uid {})", job.metadata.uid.as_deref().unwrap())), "{out}");
    assert!(out.contains("maxCostUSD: '50'") || out.contains("maxCostUSD: \"50\"") || out.contains("maxCostUSD: 50"), "{out}");
    let cast = votes.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(cast.iter().map(|v| v.spec.job_ref.generation).collect::<Vec<_>>(), [2]);
}

/// POSTs `pods/<pod>/<sub>` as `client` and returns the status code and message of the answer:
/// admission runs before the apiserver looks for a kubelet to connect to, so a refusal is the
/// policy's, and any other answer (the Pod has no host, no upgrade was asked) means it passed.
async fn connect(client: &Client, ns: &str, pod: &str, sub: &str) -> (u16, String) {
    let request = http::Request::post(format!("/api/v1/namespaces/{ns}/pods/{pod}/{sub}")).body(Vec::new()).unwrap();
    match client.request_text(request).await {
        Ok(text) => (200, text),
        Err(kube::Error::Api(s)) => (s.code, s.message),
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test]
async fn nobody_execs_into_attaches_to_or_forwards_to_an_agent_pod() {
    let ns = "ga-exec";
    let admin = setup(&[ns]).await;
    let job = create_job("dave", ns, "sealed").await;
    vote(&user("alice").await, &job, "alice", Decision::Approve).await;
    vote(&user("bob").await, &job, "bob", Decision::Approve).await;
    wait_for_job(&admin, ns, "sealed", "Running", |j| phase(j) == Some("Running")).await;
    let pods: Vec<_> = operator_pods(&admin, ns, &job).await.iter().map(|p| p.name_any()).collect();
    assert_eq!(pods, ["sealed-agent-1-agentgate"], "agent Pods' names carry the ending admission knows them by");
    let agent_pod = &pods[0];

    // dave may exec, attach, port-forward and proxy in his namespace, as `edit` grants.
    let pp = PatchParams::apply("gate-attacks").force();
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "pod-sessions", "namespace": ns},
        "rules": [{"apiGroups": [""], "resources": ["pods", "pods/exec", "pods/attach", "pods/portforward", "pods/proxy"],
                   "verbs": ["create", "get"]}]});
    Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(admin.clone(), ns).patch("pod-sessions", &pp, &Patch::Apply(&role)).await.unwrap();
    let bind = |name: &str, user: &str, role: &str| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name, "namespace": ns},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]})
    };
    let bindings = Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), ns);
    bindings.patch("dave-sessions", &pp, &Patch::Apply(&bind("dave-sessions", "dave", "pod-sessions"))).await.unwrap();
    let dave = user("dave").await;
    let refused = |(code, message): &(u16, String)| *code == 403 && message.contains("agent Pods run only what was approved");
    let exec = "exec?command=sh&stdin=true&stdout=true";
    let first = wait_for("dave's exec into the agent Pod to be refused", TIMEOUT, || connect(&dave, ns, agent_pod, exec), refused).await;
    assert!(first.1.contains("dave") && first.1.contains(agent_pod.as_str()), "the refusal names who and what: {first:?}");
    for sub in ["attach?stdin=true&stdout=true", "portforward?ports=8080", "proxy/"] {
        let answer = connect(&dave, ns, agent_pod, sub).await;
        assert!(refused(&answer), "{sub} into an agent Pod must be refused: {answer:?}");
    }

    // His own Pod is his business: the same request gets past admission (and fails only for want
    // of a kubelet).
    let plain = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
    Api::<Pod>::namespaced(dave.clone(), ns).create(&PostParams::default(), &serde_json::from_value(plain).unwrap()).await.unwrap();
    let own = connect(&dave, ns, "plain", exec).await;
    assert!(!refused(&own) && own.0 != 403, "a tenant's own Pod is not an agent Pod: {own:?}");
    // Whoever a cluster admin lets debug agents there (create on agentjobs/exec) may, and so may a
    // cluster admin.
    let debug = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "agent-debugger", "namespace": ns},
        "rules": [{"apiGroups": ["agentgate.dev"], "resources": ["agentjobs/exec"], "verbs": ["create"]}]});
    Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(admin.clone(), ns)
        .patch("agent-debugger", &pp, &Patch::Apply(&debug))
        .await
        .unwrap();
    bindings.patch("dave-debugs", &pp, &Patch::Apply(&bind("dave-debugs", "dave", "agent-debugger"))).await.unwrap();
    let granted = wait_for("dave's debug right to be seen", TIMEOUT, || connect(&dave, ns, agent_pod, exec), |a| !refused(a)).await;
    assert_ne!(granted.0, 403, "{granted:?}");
    let by_admin = connect(&admin, ns, agent_pod, exec).await;
    assert!(!refused(&by_admin), "{by_admin:?}");
    Api::<Pod>::namespaced(admin.clone(), ns).delete("plain", &DeleteParams::default()).await.unwrap();
}
