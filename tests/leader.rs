//! Leader election: of two replicas only one reconciles, and the other takes over within the lease (15 s) and a few seconds
//! of the leader's death.

mod support;

use std::time::{Duration, Instant};

use agentgate::api::AgentJob;
use kube::Api;
use kube::api::PostParams;
use support::cluster::*;
use support::controlplane::OperatorProcess;

fn log_of(operator: &OperatorProcess) -> String {
    std::fs::read_to_string(operator.log_path()).unwrap_or_default()
}

async fn submit(client: &kube::Client, ns: &str, name: &str) {
    let mut job = JobManifest::payments(name).category("ops").build();
    job.spec.resources = None; // only estimated and approved here: no Pod is ever sized
    Api::<AgentJob>::namespaced(client.clone(), ns).create(&PostParams::default(), &job).await.unwrap();
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over_within_20_seconds() {
    let ns = "leader";
    let env = Env::builder(ns).without_voting_rights().operator(OperatorMode::Later).build().await;
    let (cp, admin, args) = (env.cp, env.admin.clone(), env.operator_args());
    let mut first = OperatorProcess::start(cp, &args);
    // Give the first replica the lease before the second one campaigns.
    let start = Instant::now();
    while !log_of(&first).contains("became the leader") {
        assert!(start.elapsed() < Duration::from_secs(20), "first replica never led:\n{}", log_of(&first));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = OperatorProcess::start(cp, &args);

    submit(&admin, ns, "one").await;
    wait_for_job(&admin, ns, "one", "estimated by the leader", |j| phase(j) == Some("AwaitingApproval")).await;
    // The standby has started and campaigned: from here its log would show a takeover or a write.
    while !log_of(&second).contains("standing by for leadership") {
        assert!(start.elapsed() < Duration::from_secs(40), "the second replica never stood by:\n{}", log_of(&second));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!log_of(&second).contains("became the leader"), "two leaders at once:\n{}", log_of(&second));
    assert!(!log_of(&second).contains("phase changed"), "the standby wrote status:\n{}", log_of(&second));

    first.kill();
    let killed = Instant::now();
    submit(&admin, ns, "two").await;
    wait_for_job(&admin, ns, "two", "estimated by the new leader", |j| phase(j) == Some("AwaitingApproval")).await;
    let takeover = killed.elapsed();
    println!("standby took over and reconciled a new job {takeover:?} after the leader was killed");
    assert!(takeover < Duration::from_secs(agentgate::leader::LEASE_SECONDS + 5), "takeover took {takeover:?}");
    assert!(log_of(&second).contains("became the leader"));
}

/// A container restarted after a crash keeps its POD_NAME and, as pid 1, its pid: it must still
/// campaign as a new replica and wait out the lease its previous run held, not take it over at
/// once as if it were still the holder (it cannot know whether a standby has taken over since).
#[tokio::test]
async fn a_restarted_container_with_the_same_pod_name_waits_out_its_old_lease() {
    let ns = "leader-restart";
    let env = Env::builder(ns).without_voting_rights().operator(OperatorMode::Later).build().await;
    let (cp, admin) = (env.cp, env.admin.clone());
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(admin.clone(), ns);
    let lease = format!("agentgate-{ns}");
    let args = env.operator_args();
    let mut first = OperatorProcess::start_as_container(cp, &args, "agentgate-0");
    let start = Instant::now();
    while !log_of(&first).contains("became the leader") {
        assert!(start.elapsed() < Duration::from_secs(30), "the first run never led:\n{}", log_of(&first));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.kill();
    // The last renewal the killed run made: its lease is live until this plus its duration.
    let held = leases.get(&lease).await.unwrap().spec.unwrap();
    let old_holder = held.holder_identity.clone().unwrap();
    let expires = held.renew_time.unwrap().0 + k8s_openapi::jiff::SignedDuration::from_secs(held.lease_duration_seconds.unwrap().into());
    assert!(old_holder.starts_with("agentgate-0-"), "identity {old_holder:?} does not name the Pod");

    let second = OperatorProcess::start_as_container(cp, &args, "agentgate-0");
    let started = Instant::now();
    let taken = loop {
        // Read before the Lease: a run that leads has written the Lease first.
        let led = log_of(&second).contains("became the leader");
        let spec = leases.get(&lease).await.unwrap().spec.unwrap_or_default();
        if spec.holder_identity.as_ref().is_some_and(|h| *h != old_holder) {
            break spec;
        }
        // A run that believed it still held the lease would lead without the Lease changing hands.
        assert!(!led, "the restarted run led under the old identity:\n{}", log_of(&second));
        assert!(started.elapsed() < Duration::from_secs(30), "the restarted run never took the lease:\n{}", log_of(&second));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let new_holder = taken.holder_identity.unwrap();
    assert!(new_holder.starts_with("agentgate-0-"), "identity {new_holder:?} does not name the Pod");
    let acquired = taken.acquire_time.or(taken.renew_time).expect("the new holder's acquireTime").0;
    assert!(acquired >= expires, "the restarted run took the lease at {acquired}, before the old one expired at {expires}");
    println!("old holder {old_holder}, new holder {new_holder}; taken over {:?} after the restart", started.elapsed());
}

/// What the slow link adds to every request of the lone replica below: its renewals and reads of
/// the Lease answer that much later, as a loaded apiserver's do.
const SLOW_APISERVER: Duration = Duration::from_millis(2500);

/// A lone leader whose every request the apiserver answers seconds late keeps its term. With a
/// 10 s lease renewed 5 s before expiry, a renewal and the read confirming it had 3 s together:
/// at load 18 the busy bench's lone replica lost its own lease every 5-25 s, and each new term
/// relisted every cache (20,000 Pods) for 6-13 s before it served a job again (README "In a
/// busy cluster"). Through a link adding 2.5 s to each request it never kept a term long enough
/// to estimate the job below (it failed waiting for AwaitingApproval).
#[tokio::test]
async fn a_lone_leader_keeps_its_lease_when_every_request_takes_seconds() {
    let ns = "leader-slow";
    let env = Env::builder(ns).without_voting_rights().operator(OperatorMode::Later).build().await;
    let (cp, admin) = (env.cp, env.admin.clone());
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(admin.clone(), ns);
    let lease = format!("agentgate-{ns}");
    let kubeconfig = support::slow_link::slow_kubeconfig(cp, "admin", "leader-slow", SLOW_APISERVER);
    let operator = OperatorProcess::start_as(cp, &kubeconfig, &env.operator_args());
    let start = Instant::now();
    while !log_of(&operator).contains("became the leader") {
        assert!(start.elapsed() < Duration::from_secs(120), "the replica never led:\n{}", log_of(&operator));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    submit(&admin, ns, "slow").await;
    wait_for_job(&admin, ns, "slow", "estimated through the slow link", |j| phase(j) == Some("AwaitingApproval")).await;

    // Renewals seen landing, each through the slow link: the evidence that the lease manager has
    // kept renewing, after which a lost term would be in the log.
    let holder = leases.get(&lease).await.unwrap().spec.unwrap().holder_identity.unwrap();
    let mut renewals = std::collections::BTreeSet::new();
    let watching = Instant::now();
    while renewals.len() < 6 {
        assert!(watching.elapsed() < Duration::from_secs(120), "{} renewals in 120 s:\n{}", renewals.len(), log_of(&operator));
        let spec = leases.get(&lease).await.unwrap().spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some(holder.as_str()), "the Lease changed hands");
        renewals.insert(spec.renew_time.unwrap().0);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = log_of(&operator);
    println!(
        "figure: a lone leader, {SLOW_APISERVER:?} added to every request: {} renewals in {:.1?}, {} term(s)",
        renewals.len(),
        watching.elapsed(),
        log.matches("became the leader").count()
    );
    assert!(!log.contains("lost the leader lease"), "the lone leader lost its own lease:\n{log}");
    assert_eq!(log.matches("became the leader").count(), 1, "{log}");
}
