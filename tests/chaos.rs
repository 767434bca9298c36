//! Crash storm: pre-approved AgentJobs arrive while the operator is SIGKILLed every 1–5 s and
//! started again, and the test plays the kubelet throughout. However the crashes fall (between
//! creating a Pod and recording it, between a Pod finishing and its usage being written), every
//! job must succeed with exactly one Pod per agent per attempt ever created, and the usage in
//! the jobs' statuses must equal, token for token, what the kubelet reported.
//!
//! `make test` runs 100 jobs through at least 10 kills; `make chaos` runs 500 (release build).
//! Environment: `CHAOS_JOBS` (100), `CHAOS_MIN_KILLS` (10), `CHAOS_SEED` (random, printed).

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use support::cluster::{Env, OperatorMode};
use support::storm::{self, JobPlan, Kubelet, Rng};

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_storm_never_duplicates_a_pod_nor_loses_usage() {
    let n = env_number("CHAOS_JOBS", 100);
    let min_kills = env_number("CHAOS_MIN_KILLS", 10);
    let seed = storm::seed_from_env("CHAOS_SEED");
    let ns = "chaos";
    // One replica without leader election: a restarted process would otherwise wait out the
    // lease of the one just killed (tests/restarts.rs covers failover between replicas).
    let env = Env::builder(ns).node("chaos-node", "1000", "4Ti", &[]).args(&["--leader-election=false"]).operator(OperatorMode::Later);
    let mut env = env.build().await;
    let (admin, alice, bob) = (env.admin.clone(), env.alice.clone(), env.bob.clone());

    let plans = JobPlan::mix("storm", n);
    let creates_before = storm::pod_creates_per_apiserver(&admin).await;
    let kubelet = Kubelet::start(&admin, ns, &plans, seed).await;
    env.start_operator();
    let started = Instant::now();

    // Jobs arrive in waves, one wave after each kill, so that at least `min_kills` kills fall
    // while jobs are in flight however fast the operator is.
    let (kills_tx, kills_rx) = tokio::sync::watch::channel(0usize);
    let waves = min_kills + 1;
    let submitter = tokio::spawn({
        let plans = plans.clone();
        let (admin, alice, bob) = (admin.clone(), alice.clone(), bob.clone());
        async move {
            let mut kills = kills_rx;
            for wave in 0..waves {
                let _ = kills.wait_for(|k| *k >= wave).await;
                let chunk = plans.iter().enumerate().filter(|(i, _)| i * waves / plans.len() == wave).map(|(_, plan)| plan);
                futures::stream::iter(chunk).for_each_concurrent(8, |plan| storm::submit(&admin, &alice, &bob, ns, plan)).await;
            }
        }
    });

    let limit = Duration::from_secs(120) + Duration::from_millis(1500) * n as u32;
    let mut rng = Rng::new(seed);
    let mut kills = 0;
    let mut finished = 0;
    'storm: while started.elapsed() < limit {
        let next_kill = Instant::now() + Duration::from_millis(rng.range(1000, 5001));
        while Instant::now() < next_kill {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if submitter.is_finished() {
                let jobs = storm::list_jobs(&admin, ns).await;
                finished = storm::finished_count(&jobs);
                if finished == plans.len() {
                    break 'storm;
                }
            }
        }
        env.kill_operator();
        kills += 1;
        kills_tx.send_replace(kills);
        env.start_operator();
    }
    let storm_time = started.elapsed();
    // Should the storm end early, the waves still waiting for a kill go out now.
    drop(kills_tx);
    submitter.await.expect("submitting jobs");
    assert_eq!(finished, plans.len(), "only {finished} of {n} jobs finished within {limit:?} and {kills} kills (seed {seed})");

    // Nothing may be created after the fact: the last operator estimates a probe job created
    // now, and the kubelet's watch delivers a barrier Pod created after that, before the check.
    storm::settle(&kubelet, &admin, ns, "storm-probe").await;
    let jobs = storm::list_jobs(&admin, ns).await;
    let ledger = kubelet.stop();
    let (figures, problems) = storm::check(&admin, ns, &plans, &jobs, &ledger).await;
    let creates = storm::since(&storm::pod_creates_per_apiserver(&admin).await, &creates_before);
    println!(
        "crash storm: {kills} SIGKILLs in {storm_time:.1?}; the apiserver answered Pod creates with {creates:?} (201 created, \
         409 already exists); seed {seed}; last operator log {}",
        env.operator().log_path().display()
    );
    storm::assert_no_problems(&figures, &problems);
    assert!(kills >= min_kills, "only {kills} kills happened (wanted at least {min_kills})");
    // More 201s than planned Pods (plus the test's own barrier Pods) would be a duplicate
    // however the watch saw it.
    let created = creates.get("201").copied().unwrap_or(0);
    let barriers = ledger.barriers.len() as u64;
    assert!(
        created <= figures.pods_expected as u64 + barriers,
        "the apiserver created {created} Pods, one per agent per attempt is {} (and {barriers} barrier Pod)",
        figures.pods_expected
    );
    assert_eq!(figures.duplicates, 0);
    assert_eq!(figures.usage_lost(), 0);
}
