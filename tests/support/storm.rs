//! A workload for fault-injection tests: pre-approved AgentJobs, a kubelet that finishes their
//! Pods with usage reports it remembers, a record of every Pod that ever existed, and the check
//! that the operator neither duplicated a Pod nor lost or double-counted a usage report.
//!
//! Everything the kubelet reports is derived from a seed, so a failing run can be repeated.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate::api::{AgentJob, ApprovalVote, ApprovalVoteSpec, AttemptResult, Decision, JobRef};
use agentgate::domain::pod_builder::{LABEL_AGENT, LABEL_ATTEMPT, LABEL_JOB};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::cluster::{agent_job, try_finish_pod, try_run_pod, usage_report};

/// The seeded generator of the synthetic estimator traces: splitmix64, good enough to pick delays
/// and token counts.
pub use agentgate::evaluation::synthetic::Rng;

/// A generator for one name, independent of the order in which names come up.
pub fn rng_for_name(seed: u64, name: &str) -> Rng {
    // FNV-1a, so that the same pod name always gets the same figures under one seed.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    Rng::new(seed ^ hash)
}

/// `$name` if set (so a failing run can be replayed), else a fresh seed. Printed either way.
pub fn seed_from_env(name: &str) -> u64 {
    let seed = std::env::var(name).ok().and_then(|s| s.trim().parse().ok()).unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
    });
    println!("seed: {seed} (replay with {name}={seed})");
    seed
}

/// One job of the workload and how its attempts end: the primary agent of the first `failures`
/// attempts exits 1, and the attempt after them succeeds.
#[derive(Clone, Debug)]
pub struct JobPlan {
    pub name: String,
    /// (agent, model), primary first.
    pub agents: Vec<(String, String)>,
    pub failures: i32,
}

impl JobPlan {
    /// Mixes one- and two-agent jobs, and jobs that succeed at once, after one failed attempt,
    /// or after two.
    pub fn mix(prefix: &str, n: usize) -> Vec<JobPlan> {
        (0..n)
            .map(|i| {
                let mut agents = vec![("lead".to_string(), "gpt-4o-mini".to_string())];
                if i % 3 == 1 {
                    agents.push(("helper".to_string(), "claude-sonnet-4".to_string()));
                }
                let failures = match i % 8 {
                    2 | 5 => 1,
                    7 => 2,
                    _ => 0,
                };
                JobPlan { name: format!("{prefix}-{i:04}"), agents, failures }
            })
            .collect()
    }

    pub fn attempts(&self) -> i32 {
        self.failures + 1
    }

    fn manifest(&self) -> AgentJob {
        let agent = |(name, model): &(String, String)| json!({"name": name, "image": "ghcr.io/acme/agent:1", "model": model});
        let supporting: Vec<_> = self.agents[1..].iter().map(agent).collect();
        let mut spec = json!({
            "jobType": "storm",
            "category": "storm",
            "agents": {"primary": agent(&self.agents[0])},
            "resources": {"cpu": "10m", "memory": "16Mi"},
            "budget": {"maxCostUSD": "100"},
        });
        if !supporting.is_empty() {
            spec["agents"]["supporting"] = json!(supporting);
        }
        if self.failures > 0 {
            spec["limits"] = json!({"maxRetries": self.failures});
        }
        agent_job(&self.name, spec, json!({}))
    }

    /// Pod names of every attempt this job should ever have.
    pub fn expected_pods(&self) -> BTreeSet<String> {
        (1..=self.attempts())
            .flat_map(|attempt| self.agents.iter().map(move |(agent, _)| format!("{}-{agent}-{attempt}-agentgate", self.name)))
            .collect()
    }
}

/// Retries `op` through API outages (connection refused, 5xx, timeouts) until it succeeds or
/// `deadline` passes.
pub async fn retry<T, F, Fut>(what: &str, deadline: Duration, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let start = Instant::now();
    loop {
        match op().await {
            Ok(value) => return value,
            Err(e) if start.elapsed() < deadline => {
                verbose(&format!("{what}: {e}; retrying"));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("{what} still failing after {deadline:?}: {e}"),
        }
    }
}

/// Retries are silent unless `STORM_VERBOSE` is set.
fn verbose(line: &str) {
    if std::env::var_os("STORM_VERBOSE").is_some() {
        eprintln!("storm: {line}");
    }
}

/// How long the workload keeps retrying a request through an outage.
const OUTAGE_PATIENCE: Duration = Duration::from_secs(120);

/// Creates the job and two approving votes from category heads alice and bob, retrying through
/// outages. A create that went through but whose answer was lost shows up as 409 on the retry.
pub async fn submit(admin: &Client, alice: &Client, bob: &Client, namespace: &str, plan: &JobPlan) {
    let jobs: Api<AgentJob> = Api::namespaced(admin.clone(), namespace);
    let manifest = plan.manifest();
    let job = retry(&format!("creating {}", plan.name), OUTAGE_PATIENCE, || async {
        match jobs.create(&PostParams::default(), &manifest).await {
            Err(kube::Error::Api(s)) if s.code == 409 => jobs.get(&plan.name).await,
            other => other,
        }
    })
    .await;
    for (voter, client) in [("alice", alice), ("bob", bob)] {
        let votes: Api<ApprovalVote> = Api::namespaced(client.clone(), namespace);
        let name = format!("{}-{voter}", plan.name);
        let vote = ApprovalVote::new(
            &name,
            ApprovalVoteSpec {
                job_ref: JobRef {
                    name: plan.name.clone(),
                    uid: job.metadata.uid.clone().unwrap(),
                    generation: job.metadata.generation.unwrap_or(1),
                },
                voter: voter.into(),
                decision: Decision::Approve,
                reason: Some("pre-approved for a fault-injection run".into()),
                voter_groups: Vec::new(),
                confidence: None,
            },
        );
        retry(&format!("creating vote {name}"), OUTAGE_PATIENCE, || async {
            match votes.create(&PostParams::default(), &vote).await {
                Err(kube::Error::Api(s)) if s.code == 409 => votes.get(&name).await,
                other => other,
            }
        })
        .await;
    }
}

/// Token counts one Pod's agent reported, and how it exited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub job: String,
    pub attempt: i32,
    pub model: String,
    pub input: i64,
    pub cached: i64,
    pub output: i64,
    pub exit_code: i32,
}

/// What the kubelet saw and did.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Every uid each Pod name ever had, from any list or watch event.
    pub uids: BTreeMap<String, BTreeSet<String>>,
    /// Reports by Pod uid, recorded once the terminated status was written.
    pub reports: BTreeMap<String, Report>,
    /// Watch events saying a Pod was deleted; nothing in these tests deletes Pods.
    pub deletions: usize,
    /// Times the watch had to list again (410 Gone): a Pod created and deleted in such a gap
    /// would be missed, which is why `deletions` must stay 0 and the final list is compared too.
    pub relists: usize,
    /// Times the watch connection ended or failed and was resumed from its resourceVersion.
    pub rewatches: usize,
    /// Barrier Pods (labelled [`BARRIER_LABEL`]) the watch has delivered; the kubelet leaves them
    /// alone and the check leaves them out.
    pub barriers: BTreeSet<String>,
}

/// Marks a Pod the test creates only to learn how far the kubelet's watch has got.
pub const BARRIER_LABEL: &str = "storm.agentgate.dev/barrier";

fn is_barrier(pod: &Pod) -> bool {
    pod.labels().contains_key(BARRIER_LABEL)
}

/// The kubelet of the namespace: marks every new agent Pod Running, then terminates it with a
/// usage report derived from the seed and the Pod's name.
pub struct Kubelet {
    pub ledger: Arc<Mutex<Ledger>>,
    task: tokio::task::JoinHandle<()>,
}

impl Kubelet {
    pub async fn start(client: &Client, namespace: &str, plans: &[JobPlan], seed: u64) -> Kubelet {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let plans: Arc<BTreeMap<String, JobPlan>> = Arc::new(plans.iter().map(|p| (p.name.clone(), p.clone())).collect());
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(watch_pods(api, ledger.clone(), plans, seed, ready_tx));
        let _ = ready_rx.await;
        Kubelet { ledger, task }
    }

    /// Returns once the kubelet's watch has delivered a Pod created now: one watch delivers
    /// events in resourceVersion order, so by then it has seen every Pod created before the call.
    pub async fn barrier(&self, client: &Client, namespace: &str) {
        static BARRIERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!("storm-barrier-{}", BARRIERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {BARRIER_LABEL: "true"}},
            "spec": {"containers": [{"name": "barrier", "image": "registry.k8s.io/pause:3.10"}]},
        }))
        .expect("a barrier Pod");
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        retry(&format!("creating {name}"), OUTAGE_PATIENCE, || async {
            match api.create(&PostParams::default(), &pod).await {
                Err(kube::Error::Api(s)) if s.code == 409 => api.get(&name).await,
                other => other,
            }
        })
        .await;
        let start = Instant::now();
        while !self.ledger.lock().unwrap().barriers.contains(&name) {
            assert!(start.elapsed() < OUTAGE_PATIENCE, "the kubelet's watch never delivered barrier Pod {name}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn stop(self) -> Ledger {
        self.task.abort();
        std::mem::take(&mut *self.ledger.lock().unwrap())
    }
}

async fn watch_pods(
    api: Api<Pod>,
    ledger: Arc<Mutex<Ledger>>,
    plans: Arc<BTreeMap<String, JobPlan>>,
    seed: u64,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let seen = |pod: &Pod| {
        if is_barrier(pod) {
            ledger.lock().unwrap().barriers.insert(pod.name_any());
            return;
        }
        let uid = pod.uid().unwrap_or_default();
        let new = ledger.lock().unwrap().uids.entry(pod.name_any()).or_default().insert(uid);
        if new {
            tokio::spawn(play_kubelet(api.clone(), pod.clone(), plans.clone(), ledger.clone(), seed));
        }
    };
    loop {
        let list = match api.list(&ListParams::default()).await {
            Ok(list) => list,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        list.items.iter().for_each(seen);
        let mut version = list.metadata.resource_version.unwrap_or_default();
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        // Resuming from the last resourceVersion misses nothing; only 410 Gone forces a list.
        'watch: loop {
            let mut events = match api.watch(&WatchParams::default().timeout(290), &version).await {
                Ok(events) => events.boxed(),
                Err(_) => {
                    ledger.lock().unwrap().rewatches += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            while let Some(event) = events.next().await {
                match event {
                    Ok(WatchEvent::Added(pod) | WatchEvent::Modified(pod)) => {
                        version = pod.resource_version().unwrap_or(version);
                        seen(&pod);
                    }
                    Ok(WatchEvent::Deleted(pod)) => {
                        version = pod.resource_version().unwrap_or(version);
                        seen(&pod);
                        if !is_barrier(&pod) {
                            ledger.lock().unwrap().deletions += 1;
                        }
                    }
                    Ok(WatchEvent::Bookmark(b)) => version = b.metadata.resource_version,
                    Ok(WatchEvent::Error(e)) if e.code == 410 => {
                        ledger.lock().unwrap().relists += 1;
                        break 'watch;
                    }
                    Ok(WatchEvent::Error(_)) | Err(_) => break,
                }
            }
            ledger.lock().unwrap().rewatches += 1;
        }
    }
}

/// The life of one agent Pod: Running after a moment, then terminated with its report. Writes
/// are retried through outages; a merge patch of the same status is harmless to repeat.
async fn play_kubelet(api: Api<Pod>, pod: Pod, plans: Arc<BTreeMap<String, JobPlan>>, ledger: Arc<Mutex<Ledger>>, seed: u64) {
    let labels = pod.labels();
    let (Some(job), Some(agent), Some(attempt)) =
        (labels.get(LABEL_JOB), labels.get(LABEL_AGENT), labels.get(LABEL_ATTEMPT).and_then(|a| a.parse::<i32>().ok()))
    else {
        return;
    };
    let Some(plan) = plans.get(job) else { return };
    let terminated = pod.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed");
    if terminated {
        return;
    }
    let name = pod.name_any();
    let uid = pod.uid().unwrap_or_default();
    let model = plan.agents.iter().find(|(a, _)| a == agent).map(|(_, m)| m.clone()).unwrap_or_else(|| "gpt-4o-mini".into());
    let mut rng = rng_for_name(seed, &name);
    let input = rng.range(1_000, 40_000) as i64;
    let cached = rng.range(0, input as u64 / 4) as i64;
    let output = rng.range(100, 8_000) as i64;
    let exit_code = if attempt <= plan.failures && *agent == plan.agents[0].0 { 1 } else { 0 };
    let report = Report { job: job.clone(), attempt, model: model.clone(), input, cached, output, exit_code };
    let message = usage_report(&model, input, cached, output, json!({"pod": name}));
    let client = api.clone().into_client();
    let namespace = pod.namespace().unwrap_or_default();

    tokio::time::sleep(Duration::from_millis(rng.range(0, 300))).await;
    if !retry_status(&name, &uid, || try_run_pod(&client, &namespace, &name)).await {
        return;
    }
    tokio::time::sleep(Duration::from_millis(rng.range(50, 800))).await;
    if retry_status(&name, &uid, || try_finish_pod(&client, &namespace, &name, exit_code, &message)).await {
        ledger.lock().unwrap().reports.insert(uid, report);
    }
}

/// Runs a status write until it goes through; false if the Pod is gone or was replaced by
/// another of the same name (whose own kubelet task takes over).
async fn retry_status<F, Fut>(name: &str, uid: &str, write: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Pod, kube::Error>>,
{
    let start = Instant::now();
    loop {
        match write().await {
            Ok(written) if written.uid().as_deref() == Some(uid) => return true,
            Ok(_) => return false,
            Err(kube::Error::Api(s)) if s.code == 404 => return false,
            Err(e) if start.elapsed() < OUTAGE_PATIENCE => {
                verbose(&format!("kubelet writing {name}: {e}; retrying"));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("the kubelet could not update Pod {name} for {OUTAGE_PATIENCE:?}: {e}"),
        }
    }
}

/// Returns once the operator has estimated a probe job created now, and the kubelet's watch has
/// delivered a barrier Pod created after that: a test that then finds no extra Pod and no lost
/// usage has given the operator the chance to make one. The probe has no votes, so it creates
/// no Pod; the check only looks at planned jobs.
pub async fn settle(kubelet: &Kubelet, admin: &Client, namespace: &str, probe: &str) {
    let plan = JobPlan { name: probe.to_string(), agents: vec![("lead".into(), "gpt-4o-mini".into())], failures: 0 };
    let jobs: Api<AgentJob> = Api::namespaced(admin.clone(), namespace);
    let manifest = plan.manifest();
    retry(&format!("creating probe job {probe}"), OUTAGE_PATIENCE, || async {
        match jobs.create(&PostParams::default(), &manifest).await {
            Err(kube::Error::Api(s)) if s.code == 409 => jobs.get(probe).await,
            other => other,
        }
    })
    .await;
    let start = Instant::now();
    loop {
        let job = retry(&format!("reading probe job {probe}"), OUTAGE_PATIENCE, || jobs.get(probe)).await;
        if super::cluster::phase(&job) == Some("AwaitingApproval") {
            break;
        }
        assert!(start.elapsed() < OUTAGE_PATIENCE, "the operator never estimated probe job {probe}: {:?}", job.status);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    kubelet.barrier(admin, namespace).await;
}

/// The namespace's jobs, listed through outages.
pub async fn list_jobs(client: &Client, namespace: &str) -> Vec<AgentJob> {
    let api: Api<AgentJob> = Api::namespaced(client.clone(), namespace);
    retry("listing jobs", OUTAGE_PATIENCE, || async { api.list(&ListParams::default()).await }).await.items
}

pub fn finished_count(jobs: &[AgentJob]) -> usize {
    jobs.iter().filter(|j| matches!(super::cluster::phase(j), Some("Succeeded" | "Failed"))).count()
}

/// Totals the check compares.
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
pub struct Tokens {
    pub input: i64,
    pub cached: i64,
    pub output: i64,
}

impl Tokens {
    fn add(&mut self, input: i64, cached: i64, output: i64) {
        self.input += input;
        self.cached += cached;
        self.output += output;
    }

    pub fn total(&self) -> i64 {
        self.input + self.cached + self.output
    }
}

/// What a run amounted to, for the test's summary line.
#[derive(Debug, Default)]
pub struct Figures {
    pub jobs: usize,
    pub succeeded: usize,
    pub attempts: usize,
    pub pods_expected: usize,
    /// Distinct Pod uids ever seen.
    pub pods_seen: usize,
    /// Pods beyond one per agent per attempt: names with a second uid, or names nobody planned.
    pub duplicates: usize,
    pub reported: Tokens,
    pub recorded: Tokens,
    pub relists: usize,
    pub rewatches: usize,
}

impl Figures {
    pub fn usage_lost(&self) -> i64 {
        self.reported.total() - self.recorded.total()
    }

    pub fn summary(&self) -> String {
        format!(
            "jobs {} (succeeded {}), attempts {}, pods expected {} / created {}, duplicates {}, tokens reported {} / recorded {} \
             (lost {}), pod watch relists {} / resumes {}",
            self.jobs,
            self.succeeded,
            self.attempts,
            self.pods_expected,
            self.pods_seen,
            self.duplicates,
            self.reported.total(),
            self.recorded.total(),
            self.usage_lost(),
            self.relists,
            self.rewatches
        )
    }
}

/// The invariants: every job Succeeded after exactly its planned attempts; exactly one Pod per
/// agent per attempt ever existed (by the watch's record and the final list); each attempt's
/// usage in status, and the job's total, equal what the kubelet reported for its Pods.
/// Returns the figures and every violation found (empty when all hold).
pub async fn check(client: &Client, namespace: &str, plans: &[JobPlan], jobs: &[AgentJob], ledger: &Ledger) -> (Figures, Vec<String>) {
    let mut problems = Vec::new();
    let mut figures = Figures { jobs: plans.len(), relists: ledger.relists, rewatches: ledger.rewatches, ..Figures::default() };
    let by_name: BTreeMap<String, &AgentJob> = jobs.iter().map(|j| (j.name_any(), j)).collect();
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pods: Vec<Pod> = retry("listing pods", OUTAGE_PATIENCE, || async { pod_api.list(&ListParams::default()).await }).await.items;
    let listed: BTreeMap<String, String> =
        pods.iter().filter(|p| !is_barrier(p)).map(|p| (p.name_any(), p.uid().unwrap_or_default())).collect();
    if ledger.deletions > 0 {
        problems.push(format!("{} Pod deletion(s) seen; nothing in this test deletes Pods", ledger.deletions));
    }
    // The watch's record and the final list must agree: Pods are never deleted here.
    for (name, uid) in &listed {
        if !ledger.uids.get(name).is_some_and(|uids| uids.contains(uid)) {
            problems.push(format!("Pod {name} ({uid}) is listed but the watch never saw it"));
        }
    }
    for (name, uids) in &ledger.uids {
        for uid in uids.iter().filter(|uid| listed.get(name) != Some(*uid)) {
            problems.push(format!("Pod {name} ({uid}) was seen by the watch but is gone from the list"));
        }
    }
    figures.pods_seen = ledger.uids.values().map(BTreeSet::len).sum();
    let mut planned = BTreeSet::new();

    for plan in plans {
        let expected = plan.expected_pods();
        figures.pods_expected += expected.len();
        planned.extend(expected.iter().cloned());
        for pod in &expected {
            match ledger.uids.get(pod).map(BTreeSet::len).unwrap_or(0) {
                1 => {}
                0 => problems.push(format!("{}: Pod {pod} never existed", plan.name)),
                n => {
                    figures.duplicates += n - 1;
                    problems.push(format!("{}: Pod {pod} existed {n} times: {:?}", plan.name, ledger.uids[pod]));
                }
            }
        }
        let Some(job) = by_name.get(&plan.name) else {
            problems.push(format!("{}: the job is gone", plan.name));
            continue;
        };
        let status = job.status.clone().unwrap_or_default();
        if super::cluster::phase(job) == Some("Succeeded") {
            figures.succeeded += 1;
        } else {
            problems.push(format!(
                "{}: phase {:?}, not Succeeded; approval {:?}; conditions {:?}",
                plan.name, status.phase, status.approval, status.conditions
            ));
        }
        figures.attempts += status.attempts.len();
        let results: Vec<AttemptResult> = status.attempts.iter().map(|a| a.result).collect();
        let mut want_results = vec![AttemptResult::Failed; plan.failures as usize];
        want_results.push(AttemptResult::Succeeded);
        if results != want_results {
            problems.push(format!("{}: attempts ended {results:?}, planned {want_results:?}", plan.name));
        }

        // What the kubelet reported, per attempt, for this job's Pods (every uid it ever ran).
        let mut reported: BTreeMap<i32, Tokens> = BTreeMap::new();
        for report in ledger.reports.values().filter(|r| r.job == plan.name) {
            reported.entry(report.attempt).or_default().add(report.input, report.cached, report.output);
        }
        let mut job_reported = Tokens::default();
        for tokens in reported.values() {
            job_reported.add(tokens.input, tokens.cached, tokens.output);
        }
        figures.reported.add(job_reported.input, job_reported.cached, job_reported.output);
        let recorded =
            status.usage.as_ref().map(|u| Tokens { input: u.input_tokens, cached: u.cached_input_tokens, output: u.output_tokens });
        let recorded = recorded.unwrap_or_default();
        figures.recorded.add(recorded.input, recorded.cached, recorded.output);
        if recorded != job_reported {
            problems.push(format!("{}: status.usage {recorded:?} but the kubelet reported {job_reported:?}", plan.name));
        }
        for attempt in &status.attempts {
            let in_status =
                attempt.usage.as_ref().map(|u| Tokens { input: u.input_tokens, cached: u.cached_input_tokens, output: u.output_tokens });
            let want = reported.get(&attempt.attempt).copied().unwrap_or_default();
            if in_status.unwrap_or_default() != want {
                problems.push(format!("{}: attempt {} usage {in_status:?} but the kubelet reported {want:?}", plan.name, attempt.attempt));
            }
        }
    }
    for (name, uids) in &ledger.uids {
        if !planned.contains(name) {
            figures.duplicates += uids.len();
            problems.push(format!("Pod {name} was never planned (an extra attempt?) but existed {} time(s)", uids.len()));
        }
    }
    (figures, problems)
}

/// Panics listing every violation (the first 40), after the figures.
pub fn assert_no_problems(figures: &Figures, problems: &[String]) {
    println!("{}", figures.summary());
    if !problems.is_empty() {
        let shown: Vec<&str> = problems.iter().take(40).map(String::as_str).collect();
        panic!("{} invariant violation(s):\n{}", problems.len(), shown.join("\n"));
    }
}

/// Pod creates the apiserver has answered since it started, by response code, from its own
/// metrics: a count independent of any watch. The tests of a binary share its apiserver: a test
/// counting on this shares it only with tests that create no Pod that could be refused. A create whose client was SIGKILLed mid-request may be counted under another code (or
/// none) although the Pod was created, so the 201s bound the Pods created from below only.
pub async fn pod_creates_per_apiserver(admin: &Client) -> BTreeMap<String, u64> {
    let request = kube::core::Request::new("/metrics").list(&Default::default()).unwrap();
    let text = admin.request_text(request).await.expect("scraping the apiserver's /metrics");
    let mut by_code = BTreeMap::new();
    for line in text.lines().filter(|line| line.starts_with("apiserver_request_total{")) {
        if !["resource=\"pods\"", "verb=\"POST\"", "subresource=\"\""].iter().all(|label| line.contains(label)) {
            continue;
        }
        let code = line.split("code=\"").nth(1).and_then(|rest| rest.split('"').next()).unwrap_or_default();
        let value = line.rsplit_once(' ').and_then(|(_, v)| v.trim().parse::<f64>().ok()).unwrap_or(0.0);
        *by_code.entry(code.to_string()).or_default() += value as u64;
    }
    by_code
}

pub fn since(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after.iter().map(|(code, n)| (code.clone(), n - before.get(code).copied().unwrap_or(0))).filter(|(_, n)| *n > 0).collect()
}
