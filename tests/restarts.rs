//! Control-plane faults in the middle of a burst of pre-approved AgentJobs, with the test playing
//! the kubelet: kube-apiserver restarted, etcd restarted, the leader of two operator replicas
//! killed again and again, and two replicas through an apiserver outage longer than their lease.
//! The operator must ride out each without being restarted (its watches list again and back
//! off), never have two replicas writing at once, and keep the crash storm's invariants: every
//! job succeeds, exactly one Pod per agent per attempt ever exists, and no reported token goes
//! uncounted.
//!
//! These tests restart this binary's shared control plane, so they take turns (`SERIAL`) and live
//! apart from every other test.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use support::cluster::{Env, OperatorMode};
use support::controlplane::{OperatorProcess, strip_ansi};
use support::storm::{self, JobPlan, Kubelet};

/// One test at a time: each restarts the control plane under the others' feet.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const JOBS: usize = 40;

/// How long the rest of the burst may take once the control plane is back.
const RECOVERY: Duration = Duration::from_secs(45);

/// The namespace, a node for the whole burst and voting rights; each test starts its operator
/// replicas itself ([`Env::operator_args`]) once its kubelet runs.
async fn setup(ns: &str) -> Env {
    Env::builder(ns).node("restarts-node", "1000", "4Ti", &[]).operator(OperatorMode::Later).build().await
}

async fn submit_all(env: &Env, plans: &[JobPlan]) {
    futures::stream::iter(plans).for_each_concurrent(8, |plan| storm::submit(&env.admin, &env.alice, &env.bob, &env.ns, plan)).await;
}

/// Waits until at least `n` of the jobs have finished, or `timeout` passes (the check that
/// follows then says which jobs are stuck where).
async fn wait_finished(env: &Env, n: usize, timeout: Duration) -> Vec<agentgate::api::AgentJob> {
    let start = Instant::now();
    loop {
        let jobs = storm::list_jobs(&env.admin, &env.ns).await;
        let finished = storm::finished_count(&jobs);
        if finished >= n || start.elapsed() > timeout {
            if finished < n {
                println!("only {finished} of {n} jobs finished within {timeout:?}");
            }
            return jobs;
        }
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
    let mut operator = OperatorProcess::start(env.cp, &env.operator_args());
    let started = Instant::now();

    let (first, second) = plans.split_at(JOBS / 2);
    submit_all(&env, first).await;
    wait_finished(&env, JOBS / 4, Duration::from_secs(120)).await;
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
    let jobs = wait_finished(&env, JOBS, Duration::from_secs(180)).await;
    let (total, after_outage) = (started.elapsed(), back.elapsed());

    // Nothing may be created after the fact: the operator and the kubelet catch up first.
    storm::settle(&kubelet, &env.admin, ns, &format!("{ns}-probe")).await;
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

/// A replica's stretches of leadership, from its log: from "became the leader" to the moment it
/// was killed, lost its lease, or the end of the test.
fn leadership(log: &str, until: Timestamp) -> Vec<(Timestamp, Timestamp)> {
    let mut spans = Vec::new();
    let mut since = None;
    for line in log.lines() {
        let plain = strip_ansi(line);
        let Some(at) = plain.split_whitespace().next().and_then(|t| t.parse::<Timestamp>().ok()) else { continue };
        if plain.contains("became the leader") {
            since = Some(at);
        } else if plain.contains("lost the leader lease")
            && let Some(from) = since.take()
        {
            spans.push((from, at));
        }
    }
    spans.extend(since.map(|from| (from, until)));
    spans
}

/// The Lease's holder identity, if any.
async fn lease_holder(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases.get_opt(name).await.ok()??.spec?.holder_identity
}

/// A replica's identity in the Lease, from its "standing by for leadership identity=..." line.
fn identity_of(replica: &OperatorProcess) -> Option<String> {
    let log = String::from_utf8_lossy(&std::fs::read(replica.log_path()).ok()?).into_owned();
    let line = log.lines().map(strip_ansi).find(|l| l.contains("standing by for leadership"))?;
    Some(line.split_once("identity=")?.1.split_whitespace().next()?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_again_and_again_under_load_never_leaves_two_writers() {
    const KILLS: usize = 3;
    let _serial = SERIAL.lock().await;
    let ns = "failover";
    let env = setup(ns).await;
    let seed = storm::seed_from_env("RESTARTS_SEED");
    let mut rng = storm::Rng::new(seed);
    let plans = JobPlan::mix(ns, JOBS);
    let kubelet = Kubelet::start(&env.admin, ns, &plans, seed).await;
    let args = env.operator_args();
    let mut replicas = vec![OperatorProcess::start(env.cp, &args), OperatorProcess::start(env.cp, &args)];
    let mut retired: Vec<(OperatorProcess, Timestamp)> = Vec::new();
    let leases: Api<Lease> = Api::namespaced(env.admin.clone(), ns);
    let lease = format!("agentgate-{ns}");

    // Every change of hands, as a watch on the Lease sees it.
    let holders = Arc::new(Mutex::new(Vec::<(Timestamp, String)>::new()));
    let lease_watch = tokio::spawn({
        let (leases, holders) = (leases.clone(), holders.clone());
        let config = watcher::Config::default().fields(&format!("metadata.name={lease}"));
        watcher(leases, config).default_backoff().applied_objects().for_each(move |lease| {
            let holder = lease.ok().and_then(|l| l.spec?.holder_identity);
            let mut holders = holders.lock().unwrap();
            if let Some(holder) = holder.filter(|h| holders.last().is_none_or(|(_, last)| last != h)) {
                holders.push((Timestamp::now(), holder));
            }
            futures::future::ready(())
        })
    });

    // A wave of jobs before the first kill and after each one, so every failover happens under load.
    let (kills_tx, kills_rx) = tokio::sync::watch::channel(0usize);
    let submitter = tokio::spawn({
        let plans = plans.clone();
        let (admin, alice, bob, ns) = (env.admin.clone(), env.alice.clone(), env.bob.clone(), ns.to_string());
        async move {
            let mut kills = kills_rx;
            let waves = KILLS + 1;
            for wave in 0..waves {
                let _ = kills.wait_for(|k| *k >= wave).await;
                let chunk = plans.iter().enumerate().filter(|(i, _)| i * waves / plans.len() == wave).map(|(_, plan)| plan);
                futures::stream::iter(chunk).for_each_concurrent(8, |plan| storm::submit(&admin, &alice, &bob, &ns, plan)).await;
            }
        }
    });

    let started = Instant::now();
    let mut takeovers = Vec::new();
    for kill in 1..=KILLS {
        // The leader is one of the running replicas; let it work under load for a moment.
        let waiting = Instant::now();
        let leader = loop {
            let ids: Vec<Option<String>> = replicas.iter().map(identity_of).collect();
            if let Some(index) =
                lease_holder(&leases, &lease).await.and_then(|holder| ids.iter().position(|id| id.as_ref() == Some(&holder)))
            {
                break index;
            }
            assert!(waiting.elapsed() < Duration::from_secs(60), "no running replica took the lease within 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        takeovers.push(waiting.elapsed());
        tokio::time::sleep(Duration::from_millis(rng.range(1000, 3001))).await;
        let mut killed = std::mem::replace(&mut replicas[leader], OperatorProcess::start(env.cp, &args));
        killed.kill();
        retired.push((killed, Timestamp::now()));
        kills_tx.send_replace(kill);
    }
    submitter.await.expect("submitting jobs");
    let jobs = wait_finished(&env, JOBS, Duration::from_secs(180)).await;
    let total = started.elapsed();
    storm::settle(&kubelet, &env.admin, ns, &format!("{ns}-probe")).await;
    lease_watch.abort();
    let ledger = kubelet.stop();
    let (figures, problems) = storm::check(&env.admin, ns, &plans, &jobs, &ledger).await;
    println!("leader failover: {KILLS} leaders killed; takeovers after {takeovers:.1?}; burst of {JOBS} done in {total:.1?}; seed {seed}");
    storm::assert_no_problems(&figures, &problems);
    for replica in &mut replicas {
        assert!(
            replica.exit_status().is_none(),
            "replica exited by itself: {:?}; see {}",
            replica.exit_status(),
            replica.log_path().display()
        );
    }

    // Never two leaders: the stretches of leadership of all replicas, killed or alive, are
    // disjoint, and the Lease changed hands only when its holder had been killed.
    let spans = leadership_spans(&replicas, &retired);
    assert_eq!(spans.len(), KILLS + 1, "one stretch of leadership per leader: {spans:#?}");
    assert_one_leader_at_a_time(&spans);
    let holders = holders.lock().unwrap().clone();
    assert_eq!(holders.len(), KILLS + 1, "the Lease changed hands once per kill: {holders:#?}");

    // One writer of every job's status, and only the operator (a PUT of /status: operation Update): no ping-pong between managers.
    for job in &jobs {
        let managers: Vec<(&str, &str)> = job
            .managed_fields()
            .iter()
            .filter(|m| m.subresource.as_deref() == Some("status"))
            .map(|m| (m.manager.as_deref().unwrap_or_default(), m.operation.as_deref().unwrap_or_default()))
            .collect();
        assert_eq!(managers, [("agentgate", "Update")], "status managers of {}", job.name_any());
    }
}

/// Stretches of leadership of every replica (running or retired), sorted, with the log they came from.
fn leadership_spans(running: &[OperatorProcess], retired: &[(OperatorProcess, Timestamp)]) -> Vec<(Timestamp, Timestamp, String)> {
    let now = Timestamp::now();
    let ended = running.iter().map(|r| (r, now)).chain(retired.iter().map(|(r, at)| (r, *at)));
    let mut spans: Vec<_> = ended
        .flat_map(|(replica, until)| {
            let log = String::from_utf8_lossy(&std::fs::read(replica.log_path()).unwrap()).into_owned();
            let path = replica.log_path().display().to_string();
            leadership(&log, until).into_iter().map(move |(from, to)| (from, to, path.clone()))
        })
        .collect();
    spans.sort();
    spans
}

fn assert_one_leader_at_a_time(spans: &[(Timestamp, Timestamp, String)]) {
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "two leaders at once: {:?} and {:?}", pair[0], pair[1]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_ride_out_an_apiserver_outage_longer_than_the_lease() {
    let _serial = SERIAL.lock().await;
    let ns = "outage";
    let env = setup(ns).await;
    let seed = storm::seed_from_env("RESTARTS_SEED");
    let plans = JobPlan::mix(ns, JOBS);
    let kubelet = Kubelet::start(&env.admin, ns, &plans, seed).await;
    let args = env.operator_args();
    let mut replicas = vec![OperatorProcess::start(env.cp, &args), OperatorProcess::start(env.cp, &args)];

    let (first, second) = plans.split_at(JOBS / 2);
    submit_all(&env, first).await;
    wait_finished(&env, JOBS / 4, Duration::from_secs(120)).await;
    let cp = env.cp;
    let down = Duration::from_secs(agentgate::leader::LEASE_SECONDS + 5);
    let restart = tokio::task::spawn_blocking(move || (cp.restart_apiserver(down), Instant::now()));
    submit_all(&env, second).await;
    let (outage, back) = restart.await.expect("restarting kube-apiserver");
    let jobs = wait_finished(&env, JOBS, Duration::from_secs(180)).await;
    let after_outage = back.elapsed();
    storm::settle(&kubelet, &env.admin, ns, &format!("{ns}-probe")).await;
    let ledger = kubelet.stop();
    let (figures, problems) = storm::check(&env.admin, ns, &plans, &jobs, &ledger).await;
    let spans = leadership_spans(&replicas, &[]);
    println!(
        "two replicas, kube-apiserver down {outage:.1?}: burst done {after_outage:.1?} after it was back; leadership {spans:?}; seed {seed}"
    );
    storm::assert_no_problems(&figures, &problems);
    assert_one_leader_at_a_time(&spans);
    // The outage outlasted the lease: the leader's term ended in it and a new one began after.
    assert!(spans.len() >= 2, "leadership never changed terms through a {outage:?} outage: {spans:?}");
    for replica in &mut replicas {
        assert!(replica.exit_status().is_none(), "replica exited: {:?}; see {}", replica.exit_status(), replica.log_path().display());
    }
    assert!(after_outage < RECOVERY, "the burst took {after_outage:?} to finish after the restart");
}

#[test]
fn leadership_is_read_from_operator_logs() {
    let log = "\u{1b}[2m2026-11-24T13:49:54.906921Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2magentgate\u{1b}[0m\u{1b}[2m:\u{1b}[0m standing by for leadership
\u{1b}[2m2026-11-24T13:49:54.920783Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[2magentgate\u{1b}[0m\u{1b}[2m:\u{1b}[0m became the leader \u{1b}[3midentity\u{1b}[0m\u{1b}[2m=\u{1b}[0magentgate-13051
2026-11-24T13:50:20.499870Z ERROR agentgate: lost the leader lease; stopping so that only one replica writes
2026-11-24T13:50:30.000000Z  INFO agentgate: became the leader identity=agentgate-13051
";
    let end: Timestamp = "2026-11-24T14:00:00Z".parse().unwrap();
    let spans = leadership(log, end);
    let at = |s: &str| s.parse::<Timestamp>().unwrap();
    assert_eq!(spans, [(at("2026-11-24T13:49:54.920783Z"), at("2026-11-24T13:50:20.49987Z")), (at("2026-11-24T13:50:30Z"), end)]);
}
