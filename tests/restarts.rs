//! Control-plane faults in the middle of a burst of pre-approved AgentJobs, with the test playing
//! the kubelet: kube-apiserver restarted, etcd restarted, and the leader of two operator replicas
//! killed again and again. The operator must ride out each without being restarted (its watches
//! list again and back off) and keep the crash storm's invariants: every job succeeds, exactly
//! one Pod per agent per attempt ever exists, and no reported token goes uncounted.
//!
//! These tests restart this binary's shared control plane, so they take turns (`SERIAL`) and live
//! apart from every other test.

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::Client;
use support::cluster::{add_node, grant_voting_rights};
use support::controlplane::{ControlPlane, OperatorProcess};
use support::storm::{self, JobPlan, Kubelet};

/// One test at a time: each restarts the control plane under the others' feet.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const JOBS: usize = 40;

/// How long the rest of the burst may take once the control plane is back.
const RECOVERY: Duration = Duration::from_secs(45);

struct Env {
    cp: &'static ControlPlane,
    admin: Client,
    alice: Client,
    bob: Client,
    ns: String,
}

async fn setup(ns: &str) -> Env {
    let cp = ControlPlane::shared();
    cp.namespace(ns).await;
    let admin = cp.client("admin").await;
    add_node(&admin, "restarts-node", "1000", "4Ti", &[]).await;
    grant_voting_rights(&admin).await;
    Env { cp, alice: cp.client("alice").await, bob: cp.client("bob").await, admin, ns: ns.into() }
}

fn operator_args(ns: &str) -> [&str; 4] {
    ["--namespace", ns, "--metrics-addr", "127.0.0.1:0"]
}

async fn submit_all(env: &Env, plans: &[JobPlan]) {
    futures::stream::iter(plans).for_each_concurrent(8, |plan| storm::submit(&env.admin, &env.alice, &env.bob, &env.ns, plan)).await;
}

/// Waits until at least `n` of the jobs have finished.
async fn wait_finished(env: &Env, plans: &[JobPlan], n: usize, timeout: Duration) -> Vec<agentgate::api::AgentJob> {
    let start = Instant::now();
    loop {
        let jobs = storm::wait_until_finished(&env.admin, &env.ns, plans, Duration::ZERO).await;
        let finished = storm::finished_count(&jobs);
        if finished >= n {
            return jobs;
        }
        assert!(start.elapsed() < timeout, "only {finished} of {n} jobs finished within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Apiserver,
    Etcd,
}

/// Half the burst, then the fault once a quarter of the jobs have finished, with the other half
/// submitted during the outage (the submitter retries like any client would).
async fn burst_through(fault: Fault, ns: &str) {
    let _serial = SERIAL.lock().await;
    let env = setup(ns).await;
    let seed = storm::seed_from_env("RESTARTS_SEED");
    let plans = JobPlan::mix(ns, JOBS);
    let kubelet = Kubelet::start(&env.admin, ns, &plans, seed).await;
    let mut operator = OperatorProcess::start(env.cp, &operator_args(ns));
    let started = Instant::now();

    let (first, second) = plans.split_at(JOBS / 2);
    submit_all(&env, first).await;
    wait_finished(&env, &plans, JOBS / 4, Duration::from_secs(120)).await;
    let cp = env.cp;
    let restart = tokio::task::spawn_blocking(move || {
        let outage = match fault {
            Fault::Apiserver => cp.restart_apiserver(Duration::from_secs(1)),
            Fault::Etcd => cp.restart_etcd(Duration::from_secs(1)),
        };
        (outage, Instant::now())
    });
    submit_all(&env, second).await;
    let (outage, back) = restart.await.expect("restarting the control plane");
    let jobs = wait_finished(&env, &plans, JOBS, Duration::from_secs(180)).await;
    let (total, after_outage) = (started.elapsed(), back.elapsed());

    tokio::time::sleep(Duration::from_secs(2)).await;
    let ledger = kubelet.stop();
    let (figures, problems) = storm::check(&env.admin, ns, &plans, &jobs, &ledger).await;
    println!(
        "{fault:?} restart: unreachable for {outage:.1?}; burst of {JOBS} done in {total:.1?}, {after_outage:.1?} after the \
         restart; seed {seed}"
    );
    assert!(operator.exit_status().is_none(), "the operator exited ({:?}); see {}", operator.exit_status(), operator.log_path().display());
    storm::assert_no_problems(&figures, &problems);
    // Half the burst (and a quarter in flight) takes the operator a few seconds; a minute means
    // it sat out the outage in a backoff instead of resuming once the control plane was back.
    assert!(after_outage < RECOVERY, "the burst took {after_outage:?} to finish after the restart; see {}", operator.log_path().display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apiserver_restart_mid_burst_loses_nothing_and_needs_no_operator_restart() {
    burst_through(Fault::Apiserver, "restart-apiserver").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_restart_mid_burst_loses_nothing_and_needs_no_operator_restart() {
    burst_through(Fault::Etcd, "restart-etcd").await;
}
