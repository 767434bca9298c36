//! `make bench`: how fast, how chatty and how big the operator is, next to the physical limit
//! (a client creating Pods itself) and kube-controller-manager's Job controller.
//!
//! One local control plane (the test harness), fake Nodes, no scheduler: Pods stay Pending, and
//! what is measured is object → Pod creation. Scenarios run one after another, each in its own
//! namespace, each against a freshly started controller:
//!
//! 1. `raw`: the bench creates N Pods itself (32 at a time);
//! 2. `job-controller`: kube-controller-manager with only the Job controller, at its default
//!    client QPS and again with `--kube-api-qps=1000 --kube-api-burst=1000`; N batch/v1 Jobs;
//! 3. `agentgate`: the operator (release build) turns N pre-approved AgentJobs into N Pods;
//! 4. `agentgate steady`: pre-approved AgentJobs at 50/s for `STEADY_SECONDS` (0 skips);
//! 5. `agentgate scale`: `SCALE_JOBS` AgentJobs in mixed phases, then the operator's RSS and its
//!    own heap breakdown (`GET /debug/memory`, before the first job and after the last) (0 skips);
//! 6. `busy`: scenarios 3 and 4 again in a busy cluster (busy.rs: 20,000 foreign Pods, 2,000
//!    RBAC objects, churn while they run), and the tuned Job controller on the same cluster (how
//!    much of the gap is the cluster's), printed next to the empty-cluster rows. Before them the
//!    busy cluster's own apiserver CPU rate is measured with no jobs (churn alone, then with an
//!    idle operator); the busy rows subtract it as the others subtract the idle rate.
//!
//! API requests are the apiserver's `apiserver_request_total` delta over the scenario, minus
//! what the bench driver itself sent (counted here; the metric has no user-agent label) and
//! minus the idle background rate of the control plane measured at startup.
//!
//! Environment: `N` (1000), `STEADY_SECONDS` (60), `STEADY_RATE` (50), `SCALE_JOBS` (10000),
//! `AGENTGATE_BIN` (the operator binary; `make bench` points it at the release build),
//! `BUSY_PODS` (20000), `BUSY_NAMESPACES` (20), `BUSY_RBAC` (2000), `BUSY_CHURN` (10 Pods and
//! 10 RBAC changes per second), `BUSY_BASELINE_SECONDS` (15), `APISERVER_PPROF` (seconds of
//! kube-apiserver CPU profile per scenario, off by default).

#[path = "../support/mod.rs"]
mod support;

mod busy;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate::api::{AgentJob, ApprovalVote, ApprovalVoteSpec, Decision, JobPhase, JobRef};
use anyhow::{Context as _, Result, bail};
use futures::{StreamExt, stream};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use support::cluster::{add_node, grant_voting_rights};
use support::controlplane::{ControlPlane, ControllerManager, OperatorProcess};

const CONCURRENCY: usize = 32;
const TARGET_VS_JOB_CONTROLLER: f64 = 1.0;
const TARGET_VS_RAW: f64 = 0.8;
const TARGET_STEADY_P99_MS: f64 = 1000.0;
const TARGET_WRITES_PER_JOB: f64 = 4.0;
const TARGET_SCALE_RSS_MIB: f64 = 64.0;
/// The Job controller with its client unthrottled: the yardstick the agentgate rows are held to.
const TUNED_KCM: [&str; 2] = ["--kube-api-qps=1000", "--kube-api-burst=1000"];

fn main() -> Result<()> {
    // The operator's production default is `info`; the harness defaults to debug logging, which
    // would put the cost of formatting debug lines into every figure below.
    if std::env::var_os("AGENTGATE_OPERATOR_LOG").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("AGENTGATE_OPERATOR_LOG", "info") };
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

struct Settings {
    n: usize,
    steady_seconds: u64,
    steady_rate: u64,
    scale_jobs: usize,
    /// `SCENARIOS=agentgate,scale` runs only those (to profile one); the default runs all.
    only: Option<Vec<String>>,
}

impl Settings {
    fn runs(&self, scenario: &str) -> bool {
        self.only.as_ref().is_none_or(|only| only.iter().any(|s| s == scenario))
    }
}

const SCENARIO_NAMES: [&str; 7] = ["raw", "job-controller", "inputs", "agentgate", "steady", "busy", "scale"];

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().map_err(|_| anyhow::anyhow!("{name}={v:?} is not a number")),
        _ => Ok(default),
    }
}

async fn run() -> Result<()> {
    let settings = Settings {
        n: env_number("N", 1000)?,
        steady_seconds: env_number("STEADY_SECONDS", 60)?,
        steady_rate: env_number("STEADY_RATE", 50)?,
        scale_jobs: env_number("SCALE_JOBS", 10_000)?,
        only: std::env::var("SCENARIOS")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect()),
    };
    if let Some(unknown) = settings.only.iter().flatten().find(|s| !SCENARIO_NAMES.contains(&s.as_str())) {
        anyhow::bail!("SCENARIOS: unknown scenario {unknown:?} (known: {})", SCENARIO_NAMES.join(","));
    }
    anyhow::ensure!(settings.n > 0, "N must be at least 1");
    let operator_bin = std::env::var("AGENTGATE_BIN").unwrap_or_else(|_| "(harness default: target/debug/agentgate)".into());
    let started = Instant::now();
    println!(
        "agentgate bench: N={} STEADY_SECONDS={} STEADY_RATE={} SCALE_JOBS={} operator={operator_bin}",
        settings.n, settings.steady_seconds, settings.steady_rate, settings.scale_jobs
    );

    let cp = ControlPlane::shared();
    let admin = driver_client(cp, "admin").await?;
    for i in 0..4 {
        add_node(&admin, &format!("bench-node-{i}"), "512", "2Ti", &[]).await;
    }
    grant_voting_rights(&admin).await;
    let env = Env { cp, admin: admin.clone(), alice: driver_client(cp, "alice").await?, bob: driver_client(cp, "bob").await? };
    println!("control plane {} (logs in {})", cp.server(), cp.dir().display());
    println!("load average (1/5/15 min) at the start: {}", busy::load_average());

    // What the control plane does on its own (lease renewals, its own informers), per second.
    let idle = Window::open(&env.admin, None).await?;
    let idle_cpu = ControlPlaneCpu::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_apiserver = idle_cpu.since().0.unwrap_or(0.0) / idle_cpu.at.elapsed().as_secs_f64();
    *APISERVER_IDLE_CPU.lock().unwrap() = idle_apiserver;
    println!("idle control plane background: kube-apiserver {:.0} ms CPU/s (subtracted from every scenario)", idle_apiserver * 1000.0);
    let background = idle.close(&env.admin, &BTreeMap::new()).await?.per_second();
    println!(
        "idle control plane background: {:.2} requests/s (subtracted from every scenario)",
        background.values().fold(0.0, |sum, v| sum + v)
    );

    let mut outcomes = Vec::new();
    let n = settings.n;
    if settings.runs("raw") {
        outcomes.push(scenario_raw(&env, n, &background).await?);
    }
    if settings.runs("job-controller") {
        outcomes.push(scenario_job_controller(&env, n, &background, "job-controller (default QPS)", "bench-kcm-default", &[], None).await?);
        outcomes
            .push(scenario_job_controller(&env, n, &background, "job-controller (qps=1000)", "bench-kcm-tuned", &TUNED_KCM, None).await?);
    }
    if settings.runs("inputs") {
        outcomes.push(scenario_agentgate_inputs(&env, n, &background).await?);
    }
    if settings.runs("agentgate") {
        outcomes.push(scenario_agentgate(&env, n, &background, None).await?);
    }
    if settings.steady_seconds > 0 && settings.runs("steady") {
        outcomes.push(scenario_steady(&env, settings.steady_seconds, settings.steady_rate, &background, None).await?);
    }
    let mut busy_baseline = None;
    if settings.runs("busy") {
        let shape = busy::Shape::from_env()?;
        busy::populate(&env, &shape).await?;
        let churn = busy::Churn::start(&env, &shape, 0);
        let baseline = busy::baseline(&env, env_number("BUSY_BASELINE_SECONDS", 15)?, &background).await?;
        // The busy rows' api ms/job is net of the busy cluster's own rate, not the empty one's.
        let empty_idle = std::mem::replace(&mut *APISERVER_IDLE_CPU.lock().unwrap(), baseline.churn_apiserver_ms_per_second / 1000.0);
        busy_baseline = Some(baseline);
        outcomes.push(scenario_agentgate(&env, n, &background, Some(&churn)).await?);
        // The same busy cluster under a controller that is not ours: how much of the gap is the cluster's.
        outcomes.push(
            scenario_job_controller(&env, n, &background, "job-controller (busy)", "bench-kcm-busy", &TUNED_KCM, Some(&churn)).await?,
        );
        let (pods, rbac) = churn.stop().await;
        println!("    churn: {pods} foreign Pods terminated, {rbac} RBAC changes");
        if settings.steady_seconds > 0 {
            let churn = busy::Churn::start(&env, &shape, 1_000_003);
            outcomes.push(scenario_steady(&env, settings.steady_seconds, settings.steady_rate, &background, Some(&churn)).await?);
            let (pods, rbac) = churn.stop().await;
            println!("    churn: {pods} foreign Pods terminated, {rbac} RBAC changes");
        }
        busy::clear(&env, &shape).await?;
        *APISERVER_IDLE_CPU.lock().unwrap() = empty_idle;
    }
    if settings.scale_jobs > 0 && settings.runs("scale") {
        outcomes.push(scenario_scale(&env, settings.scale_jobs, &background).await?);
    }

    let targets = evaluate_targets(&outcomes);
    print_report(&outcomes, &targets, &background, busy_baseline.as_ref());
    write_json(&settings, &outcomes, &targets, &background, busy_baseline.as_ref(), started.elapsed())?;
    println!("\nbench finished in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// A client for one of the harness's users without kube's built-in retries (429, 503, 504), so
/// that every request the driver sends goes through [`create`] and is counted.
async fn driver_client(cp: &ControlPlane, user: &str) -> Result<Client> {
    let path = cp.kubeconfig(user);
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default()).await?;
    config.default_retry = false;
    Ok(Client::try_from(config)?)
}

/// 429 Too Many Requests the driver got (API Priority and Fairness throttles alice and bob;
/// admin, which the controllers use, is exempt).
static DRIVER_THROTTLED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

struct Env {
    cp: &'static ControlPlane,
    admin: Client,
    alice: Client,
    bob: Client,
}

// ---------------------------------------------------------------------------------------------
// Counting requests.

/// (verb, resource, subresource) as apiserver_request_total labels them: verbs are POST, PUT,
/// PATCH, APPLY (server-side apply), DELETE, DELETECOLLECTION, GET, LIST, WATCH; for non-resource
/// requests resource is empty and subresource is the path.
type Key = (String, String, String);

/// Requests the bench driver itself sent, in the same keys; reset at the start of each window.
static DRIVER: Mutex<BTreeMap<Key, f64>> = Mutex::new(BTreeMap::new());

/// Resource requests the driver sent, watches aside, never reset: [`settle`] waits for the
/// others' requests to stop, and the busy rows' churn never does.
static DRIVER_SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn count(verb: &str, resource: &str, subresource: &str) {
    if verb != "WATCH" && !resource.is_empty() {
        DRIVER_SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    *DRIVER.lock().unwrap().entry((verb.into(), resource.into(), subresource.into())).or_default() += 1.0;
}

fn take_driver_counts() -> BTreeMap<Key, f64> {
    std::mem::take(&mut *DRIVER.lock().unwrap())
}

/// `apiserver_request_total` summed by (verb, resource, subresource), and error responses by
/// `"VERB resource[/subresource] code"`.
async fn scrape(admin: &Client) -> Result<(BTreeMap<Key, f64>, BTreeMap<String, f64>)> {
    let request = kube::core::Request::new("/metrics").list(&ListParams::default())?;
    let text = admin.request_text(request).await.context("scraping the apiserver's /metrics")?;
    let mut sums = BTreeMap::new();
    let mut errors = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else { continue };
        let Some((labels, value)) = rest.rsplit_once("} ") else { continue };
        let labels = parse_labels(labels);
        let label = |name: &str| labels.get(name).cloned().unwrap_or_default();
        let value: f64 = value.trim().parse().unwrap_or(0.0);
        let key = (label("verb"), label("resource"), label("subresource"));
        if label("code").starts_with('4') || label("code").starts_with('5') {
            *errors.entry(format!("{} {}", key_name(&key), label("code"))).or_default() += value;
        }
        *sums.entry(key).or_default() += value;
    }
    anyhow::ensure!(!sums.is_empty(), "the apiserver's /metrics has no apiserver_request_total");
    Ok((sums, errors))
}

fn parse_labels(s: &str) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find("=\"") {
        let name = rest[..eq].trim_start_matches(',').trim().to_string();
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let mut end = rest.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                '"' => {
                    end = eq + 2 + i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(name, value);
        rest = &rest[end.min(rest.len())..];
    }
    labels
}

fn is_write(verb: &str) -> bool {
    matches!(verb, "POST" | "PUT" | "PATCH" | "APPLY" | "DELETE" | "DELETECOLLECTION")
}

/// `verb resource[/subresource]`, or `verb /path` for non-resource requests.
fn key_name((verb, resource, sub): &Key) -> String {
    match (resource.as_str(), sub.as_str()) {
        ("", path) => format!("{verb} {path}"),
        (resource, "") => format!("{verb} {resource}"),
        (resource, sub) => format!("{verb} {resource}/{sub}"),
    }
}

/// A measurement window: apiserver request counters and the controller's CPU at its opening.
struct Window {
    before: BTreeMap<Key, f64>,
    errors_before: BTreeMap<String, f64>,
    opened: Instant,
    pid: Option<u32>,
    cpu_before: Option<f64>,
}

/// Requests others made during a window, net of the driver and the background.
struct Requests {
    net: BTreeMap<Key, f64>,
    /// Error responses (any client, the driver's included) by "VERB resource[/subresource] code".
    errors: BTreeMap<String, f64>,
    seconds: f64,
}

impl Requests {
    fn per_second(&self) -> BTreeMap<Key, f64> {
        self.net.iter().map(|(k, v)| (k.clone(), v / self.seconds.max(1e-9))).collect()
    }
    fn writes(&self) -> f64 {
        self.net.iter().filter(|(k, _)| is_write(&k.0) && !k.1.is_empty()).fold(0.0, |sum, (_, v)| sum + v)
    }
    fn event_writes(&self) -> f64 {
        self.net.iter().filter(|(k, _)| is_write(&k.0) && k.1 == "events").fold(0.0, |sum, (_, v)| sum + v)
    }
    /// Resource requests only: non-resource ones (/openapi/v3 and such) are listed separately.
    fn verb(&self, verb: &str) -> f64 {
        self.net.iter().filter(|(k, _)| k.0 == verb && !k.1.is_empty()).fold(0.0, |sum, (_, v)| sum + v)
    }
}

impl Window {
    async fn open(admin: &Client, pid: Option<u32>) -> Result<Window> {
        let (before, errors_before) = scrape(admin).await?;
        take_driver_counts();
        DRIVER_THROTTLED.store(0, std::sync::atomic::Ordering::Relaxed);
        Ok(Window {
            before,
            errors_before,
            opened: Instant::now(),
            pid,
            cpu_before: pid.and_then(|p| proc_stats(p).map(|s| s.cpu_seconds)),
        })
    }

    fn controller_stats(&self) -> Option<(ProcStats, f64)> {
        let stats = proc_stats(self.pid?)?;
        let cpu = stats.cpu_seconds - self.cpu_before.unwrap_or(0.0);
        Some((stats, cpu))
    }

    /// Call once the controller is stopped and the driver's watches are closed: the apiserver
    /// counts a WATCH only when it ends.
    async fn close(self, admin: &Client, background: &BTreeMap<Key, f64>) -> Result<Requests> {
        let seconds = self.opened.elapsed().as_secs_f64();
        let (after, errors_after) = scrape(admin).await?;
        let driver = take_driver_counts();
        let errors = errors_after
            .iter()
            .map(|(key, value)| (key.clone(), value - self.errors_before.get(key).copied().unwrap_or(0.0)))
            .filter(|(_, v)| *v > 0.5)
            .collect();
        let mut net = BTreeMap::new();
        for (key, value) in &after {
            let delta = value - self.before.get(key).copied().unwrap_or(0.0);
            let others = delta - driver.get(key).copied().unwrap_or(0.0) - background.get(key).copied().unwrap_or(0.0) * seconds;
            if others > 0.05 {
                net.insert(key.clone(), others);
            }
        }
        Ok(Requests { net, errors, seconds })
    }
}

/// Waits until the apiserver sees no more than background traffic (at most 2 resource
/// requests, watches and the driver's own aside, in 1 s), so that a controller's trailing work
/// (status writes after the last Pod, retries) is counted before it is stopped. Gives up after
/// `limit`. The driver's requests (the busy rows' churn) do not count: before they were
/// subtracted, every busy row waited the whole minute and billed the churn's apiserver CPU
/// over it to its jobs.
async fn settle(admin: &Client, limit: Duration) -> Result<f64> {
    let started = Instant::now();
    let total = |sums: &BTreeMap<Key, f64>| {
        sums.iter().filter(|(k, _)| !k.1.is_empty() && k.0 != "WATCH").fold(0.0, |sum, (_, v)| sum + v)
            - DRIVER_SENT.load(std::sync::atomic::Ordering::Relaxed) as f64
    };
    let mut last = total(&scrape(admin).await?.0);
    while started.elapsed() < limit {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = total(&scrape(admin).await?.0);
        if now - last <= 2.0 {
            break;
        }
        last = now;
    }
    Ok(started.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// Process statistics.

#[derive(Clone, Copy, Debug)]
struct ProcStats {
    rss_kib: u64,
    hwm_kib: u64,
    cpu_seconds: f64,
}

fn proc_stats(pid: u32) -> Option<ProcStats> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> { status.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse().ok() };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); fields[0] is field 3 (state).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    Some(ProcStats { rss_kib: field("VmRSS:")?, hwm_kib: field("VmHWM:")?, cpu_seconds: (utime + stime) / ticks })
}

/// Where the process's resident memory is, from /proc/<pid>/smaps: the binary's text (code),
/// its other mappings (read-only data, relocations), anonymous memory (jemalloc's heap, thread
/// stacks), shared libraries and the rest, in MiB. Anonymous memory is what the caches cost.
fn memory_breakdown(pid: u32) -> Option<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?.to_string_lossy().into_owned();
    let mut sums: BTreeMap<&str, u64> = BTreeMap::new();
    let mut group = "other";
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let perms = words.next().unwrap_or_default();
            let path = words.nth(3).unwrap_or_default();
            group = match path {
                p if p == exe && perms.contains('x') => "binary text",
                p if p == exe => "binary data",
                "" | "[heap]" => "anonymous",
                p if p.starts_with("[stack") => "anonymous",
                p if p.starts_with('/') => "libraries",
                _ => "other",
            };
        } else if first == "Rss:" {
            *sums.entry(group).or_default() += words.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    let parts: Vec<String> = sums.iter().map(|(group, kib)| format!("{group} {:.1}", *kib as f64 / 1024.0)).collect();
    Some(format!("RSS by mapping (MiB): {}", parts.join(", ")))
}

/// The operator's own account of its heap (`GET /debug/memory`: jemalloc's totals and each
/// cache and index sized object by object), from the metrics address its log names.
async fn operator_memory_report(log: &Path) -> Option<String> {
    use std::io::{Read, Write};
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().find(|l| l.contains("/debug/memory"))?;
    // Drop the terminal colour codes around `addr=`.
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            plain.push(c);
        }
    }
    let addr = plain.split_whitespace().find_map(|w| w.strip_prefix("addr="))?.to_string();
    let response = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&addr).ok()?;
        stream.write_all(b"GET /debug/memory HTTP/1.0\r\nHost: operator\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        Some(response)
    })
    .await
    .ok()??;
    Some(response.split_once("\r\n\r\n")?.1.trim_end().to_string())
}

/// CPU seconds of our direct children named `comm` (etcd, kube-apiserver), for context.
fn child_cpu(comm: &str) -> Option<f64> {
    let me = std::process::id().to_string();
    let mut total = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        if &stat[open + 1..close] != comm {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if fields.get(1) != Some(&me.as_str()) {
            continue;
        }
        let pid: u32 = entry.file_name().to_str().and_then(|s| s.parse().ok())?;
        if let Some(s) = proc_stats(pid) {
            *total.get_or_insert(0.0) += s.cpu_seconds;
        }
    }
    total
}

struct ControlPlaneCpu {
    apiserver: Option<f64>,
    etcd: Option<f64>,
    at: Instant,
    /// The apiserver's CPU seconds per second with no scenario running, when this was taken.
    idle_rate: f64,
}

/// The idle control plane's apiserver CPU (seconds per second), measured at startup with the
/// idle request rate; subtracted from every scenario's apiserver CPU like the requests. The
/// busy rows set it to the busy cluster's own rate (its churn, no jobs) while they run.
static APISERVER_IDLE_CPU: Mutex<f64> = Mutex::new(0.0);

impl ControlPlaneCpu {
    fn now() -> Self {
        ControlPlaneCpu {
            apiserver: child_cpu("kube-apiserver"),
            etcd: child_cpu("etcd"),
            at: Instant::now(),
            idle_rate: *APISERVER_IDLE_CPU.lock().unwrap(),
        }
    }
    fn since(&self) -> (Option<f64>, Option<f64>) {
        let now = ControlPlaneCpu::now();
        (now.apiserver.zip(self.apiserver).map(|(a, b)| a - b), now.etcd.zip(self.etcd).map(|(a, b)| a - b))
    }
    /// The apiserver's CPU seconds since `self`, minus the idle rate over that time.
    fn apiserver_net(&self) -> Option<f64> {
        let idle = self.idle_rate * self.at.elapsed().as_secs_f64();
        self.since().0.map(|cpu| (cpu - idle).max(0.0))
    }
}

// ---------------------------------------------------------------------------------------------
// Watching: LIST then WATCH, re-watching as needed, counted as driver requests.

/// Counts a WATCH when it ends (the apiserver counts it then too), including when the watching
/// task is aborted.
struct WatchCounted(&'static str);

impl Drop for WatchCounted {
    fn drop(&mut self) {
        count("WATCH", self.0, "");
    }
}

/// Calls `on` for every object listed or seen by the watch; the returned receiver fires once
/// the initial list is done. Abort the handle to stop.
fn spawn_watch<K>(
    api: Api<K>,
    resource: &'static str,
    on: impl Fn(&K) + Send + Sync + 'static,
) -> (tokio::task::JoinHandle<()>, tokio::sync::oneshot::Receiver<()>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let handle = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            count("LIST", resource, "");
            let list = match api.list(&ListParams::default()).await {
                Ok(list) => list,
                Err(e) => {
                    eprintln!("bench: listing {resource} failed: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            for obj in &list.items {
                on(obj);
            }
            let mut version = list.metadata.resource_version.unwrap_or_default();
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
            'watch: loop {
                let counted = WatchCounted(resource);
                let mut events = match api.watch(&WatchParams::default().timeout(290), &version).await {
                    Ok(events) => events.boxed(),
                    Err(e) => {
                        eprintln!("bench: watching {resource} failed: {e}; retrying");
                        drop(counted);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                while let Some(event) = events.next().await {
                    match event {
                        Ok(WatchEvent::Added(obj) | WatchEvent::Modified(obj)) => {
                            version = obj.resource_version().unwrap_or(version);
                            on(&obj);
                        }
                        Ok(WatchEvent::Deleted(obj)) => version = obj.resource_version().unwrap_or(version),
                        Ok(WatchEvent::Bookmark(b)) => version = b.metadata.resource_version,
                        // Most likely 410 Gone: list again.
                        Ok(WatchEvent::Error(_)) => break 'watch,
                        Err(_) => break,
                    }
                }
            }
        }
    });
    (handle, ready_rx)
}

async fn stop(handle: tokio::task::JoinHandle<()>) {
    handle.abort();
    let _ = handle.await;
}

/// First-seen times by key, and how many keys there are.
struct Seen {
    first: Mutex<HashMap<String, Instant>>,
    count: tokio::sync::watch::Sender<usize>,
}

impl Seen {
    fn new() -> Arc<Seen> {
        Arc::new(Seen { first: Mutex::new(HashMap::new()), count: tokio::sync::watch::channel(0).0 })
    }

    fn record(&self, key: String) {
        let mut first = self.first.lock().unwrap();
        if let std::collections::hash_map::Entry::Vacant(entry) = first.entry(key) {
            entry.insert(Instant::now());
            let n = first.len();
            self.count.send_replace(n);
        }
    }

    /// Waits until `n` keys are seen or `timeout` passes; returns how many were seen.
    async fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        let mut rx = self.count.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|seen| *seen >= n)).await;
        *rx.borrow()
    }

    fn snapshot(&self) -> HashMap<String, Instant> {
        self.first.lock().unwrap().clone()
    }
}

/// Watches Pods in `namespace`, keyed by their controller owner's name (else their own name).
async fn watch_pods(client: &Client, namespace: &str) -> (tokio::task::JoinHandle<()>, Arc<Seen>) {
    let seen = Seen::new();
    let recorder = seen.clone();
    let (handle, ready) = spawn_watch(Api::<Pod>::namespaced(client.clone(), namespace), "pods", move |pod: &Pod| {
        let owner = pod.owner_references().iter().find(|o| o.controller == Some(true)).map(|o| o.name.clone());
        recorder.record(owner.unwrap_or_else(|| pod.name_any()));
    });
    let _ = ready.await;
    (handle, seen)
}

// ---------------------------------------------------------------------------------------------
// Creating, with the driver's requests counted.

/// Created objects' names and the moment just before their create was issued and, for an
/// approved AgentJob, the moment its last vote's create returned: the driver's part of the
/// latency ends there and the operator's begins (where a tail comes from: the apiserver's
/// answers to the driver, or the operator's work after them).
#[derive(Default)]
struct Submissions {
    started: HashMap<String, Instant>,
    inputs_done: HashMap<String, Instant>,
}
type Created = Arc<Mutex<Submissions>>;

async fn create<K>(api: &Api<K>, resource: &str, object: &K) -> Result<K>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        count("POST", resource, "");
        match api.create(&PostParams::default(), object).await {
            Ok(created) => return Ok(created),
            // An earlier attempt that timed out on our side may have gone through.
            Err(kube::Error::Api(s)) if s.code == 409 && attempt > 1 => {
                count("GET", resource, "");
                return Ok(api.get(&object.name_any()).await?);
            }
            // Throttled: wait as long as the apiserver's Retry-After (1 s) asks, like client-go.
            Err(kube::Error::Api(s)) if s.code == 429 && attempt < 60 => {
                DRIVER_THROTTLED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) if attempt < 10 => {
                eprintln!("bench: creating {resource} {} failed ({e}); retrying", object.name_any());
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("creating {resource} {}", object.name_any())),
        }
    }
}

fn object<K: DeserializeOwned>(value: Value) -> K {
    serde_json::from_value(value).expect("a valid manifest")
}

fn pod_manifest(name: &str) -> Pod {
    object(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox:1.36", "command": ["true"],
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "10m", "memory": "16Mi"}}}]}}))
}

fn job_manifest(name: &str) -> Job {
    object(json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"parallelism": 1, "completions": 1, "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox:1.36", "command": ["true"],
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "10m", "memory": "16Mi"}}}]}}}}))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Two approving votes right after the job: it should get its Pod.
    Approved,
    /// No votes: it waits in AwaitingApproval.
    Unvoted,
    /// p90 estimate over the budget: Rejected.
    OverBudget,
}

fn agent_job_manifest(name: &str, kind: Kind) -> AgentJob {
    let (model, budget) = match kind {
        Kind::OverBudget => ("claude-opus-4", "0.01"),
        _ => ("gpt-4o-mini", "5.00"),
    };
    object(json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob", "metadata": {"name": name},
        "spec": {"jobType": "bench", "category": "bench",
            "agents": {"primary": {"name": "agent", "image": "ghcr.io/acme/agent:1", "model": model}},
            "resources": {"cpu": "10m", "memory": "16Mi"},
            "budget": {"maxCostUSD": budget}}}))
}

/// Creates the job (recording when), then alice's and bob's approving votes if `kind` says so.
async fn submit_agent_job(env: &Env, namespace: &str, name: String, kind: Kind, created: &Created) -> Result<()> {
    let jobs: Api<AgentJob> = Api::namespaced(env.admin.clone(), namespace);
    created.lock().unwrap().started.insert(name.clone(), Instant::now());
    let job = create(&jobs, "agentjobs", &agent_job_manifest(&name, kind)).await?;
    if kind == Kind::Approved {
        for (voter, client) in [("alice", &env.alice), ("bob", &env.bob)] {
            let vote = ApprovalVote::new(
                &format!("{name}-{voter}"),
                ApprovalVoteSpec {
                    job_ref: JobRef {
                        name: name.clone(),
                        uid: job.metadata.uid.clone().unwrap_or_default(),
                        generation: job.metadata.generation.unwrap_or(1),
                    },
                    voter: voter.into(),
                    decision: Decision::Approve,
                    reason: Some("bench".into()),
                    voter_groups: Vec::new(),
                    confidence: None,
                },
            );
            create(&Api::<ApprovalVote>::namespaced(client.clone(), namespace), "approvalvotes", &vote).await?;
        }
        created.lock().unwrap().inputs_done.insert(name, Instant::now());
    }
    Ok(())
}

/// Runs `make(i)` for i in 0..n, `CONCURRENCY` at a time.
async fn closed_loop<F, Fut>(n: usize, make: F) -> Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let results: Vec<Result<()>> = stream::iter(0..n).map(make).buffer_unordered(CONCURRENCY).collect().await;
    results.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// Results.

#[derive(Debug, Default, Serialize)]
struct Outcome {
    scenario: String,
    n: usize,
    /// Objects whose Pod (or, for scale, status) was seen before the timeout.
    completed: usize,
    wall_seconds: Option<f64>,
    pods_per_second: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    /// What p50/p99 measure.
    latency: String,
    /// For approved AgentJobs: p50/p99 split where the driver's last vote create returned.
    latency_split: Option<LatencySplit>,
    /// Every write, Events included.
    writes_per_job: Option<f64>,
    /// Of those, Event creates and patches (the target counts Pod creates and status writes).
    event_writes_per_job: Option<f64>,
    lists_per_job: Option<f64>,
    watches_per_job: Option<f64>,
    gets_per_job: Option<f64>,
    /// Requests by others per job, by "VERB resource[/subresource]".
    requests_per_job: BTreeMap<String, f64>,
    /// Error responses during the scenario (from anyone) per job, by "VERB resource[/subresource] code".
    errors_per_job: BTreeMap<String, f64>,
    /// When the driver had finished creating everything, from its first create.
    driver_done_seconds: Option<f64>,
    /// How long the controller kept the apiserver busy after the last Pod (or status) was seen.
    settled_seconds: Option<f64>,
    /// 429s the driver got during the scenario.
    driver_throttled: u64,
    peak_rss_mib: Option<f64>,
    rss_mib: Option<f64>,
    controller_cpu_seconds: Option<f64>,
    apiserver_cpu_seconds: Option<f64>,
    /// The apiserver's CPU during the scenario net of its idle rate, per job (ms).
    apiserver_cpu_ms_per_job: Option<f64>,
    /// The idle rate subtracted (ms of apiserver CPU per second): the empty control plane's, or
    /// in a busy row the busy cluster's with its churn and no jobs.
    apiserver_idle_ms_per_second: Option<f64>,
    etcd_cpu_seconds: Option<f64>,
    notes: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
struct LatencySplit {
    /// From the job's create call to its last vote's create returning (the apiserver's answers).
    inputs_p50_ms: Option<f64>,
    inputs_p99_ms: Option<f64>,
    /// From there to the Pod (scale: the status) first seen: the operator's work, its writes, the watch.
    after_inputs_p50_ms: Option<f64>,
    after_inputs_p99_ms: Option<f64>,
}

impl Outcome {
    fn add_requests(&mut self, requests: &Requests) {
        self.driver_throttled = DRIVER_THROTTLED.load(std::sync::atomic::Ordering::Relaxed);
        let per_job = |v: f64| v / self.n as f64;
        self.writes_per_job = Some(per_job(requests.writes()));
        self.event_writes_per_job = Some(per_job(requests.event_writes()));
        self.lists_per_job = Some(per_job(requests.verb("LIST")));
        self.watches_per_job = Some(per_job(requests.verb("WATCH")));
        self.gets_per_job = Some(per_job(requests.verb("GET")));
        self.requests_per_job = requests.net.iter().map(|(key, v)| (key_name(key), per_job(*v))).collect();
        self.errors_per_job = requests.errors.iter().map(|(key, v)| (key.clone(), per_job(*v))).collect();
    }

    fn add_controller(&mut self, stats: Option<(ProcStats, f64)>) {
        if let Some((stats, cpu)) = stats {
            self.peak_rss_mib = Some(stats.hwm_kib as f64 / 1024.0);
            self.rss_mib = Some(stats.rss_kib as f64 / 1024.0);
            self.controller_cpu_seconds = Some(cpu);
        }
    }

    fn add_control_plane_cpu(&mut self, cpu: &ControlPlaneCpu) {
        let (apiserver, etcd) = cpu.since();
        self.apiserver_cpu_seconds = apiserver;
        self.apiserver_cpu_ms_per_job = cpu.apiserver_net().map(|s| s * 1000.0 / self.n.max(1) as f64);
        self.apiserver_idle_ms_per_second = Some(cpu.idle_rate * 1000.0);
        self.etcd_cpu_seconds = etcd;
    }
}

/// Latency percentiles (ms) from creation to first seen, the wall time from `t0` to the n-th
/// seen, and how many were seen.
fn latencies(
    created: &HashMap<String, Instant>,
    seen: &HashMap<String, Instant>,
    t0: Instant,
    n: usize,
) -> (usize, Option<f64>, Option<f64>, Option<f64>) {
    let mut ms: Vec<f64> =
        created.iter().filter_map(|(name, at)| seen.get(name).map(|s| s.saturating_duration_since(*at).as_secs_f64() * 1000.0)).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    let completed = ms.len();
    let mut times: Vec<Instant> = created.keys().filter_map(|name| seen.get(name).copied()).collect();
    times.sort();
    let wall = (completed >= n).then(|| times[n - 1].saturating_duration_since(t0).as_secs_f64());
    (completed, wall, percentile(&ms, 0.50), percentile(&ms, 0.99))
}

fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn timeout_for(per_item: f64, n: usize) -> Duration {
    Duration::from_secs_f64(120.0 + per_item * n as f64)
}

/// `APISERVER_PPROF=<seconds>`: a CPU profile of kube-apiserver over each scenario's first
/// seconds (from its first create), written to `target/bench/pprof/<scenario>.pprof` for `go
/// tool pprof -top`. kube-apiserver serves `/debug/pprof` (`--profiling` is on by default) to
/// admin, a system:masters member. Off by default: the profiler costs the apiserver a little.
struct ApiserverProfile(Option<tokio::task::JoinHandle<()>>);

impl ApiserverProfile {
    fn start(env: &Env, scenario: &str) -> ApiserverProfile {
        let Some(seconds) = std::env::var("APISERVER_PPROF").ok().and_then(|v| v.trim().parse::<u64>().ok()).filter(|s| *s > 0) else {
            return ApiserverProfile(None);
        };
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/pprof");
        let slug: String = scenario.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
        let path = dir.join(format!("{}.pprof", slug.split('-').filter(|w| !w.is_empty()).collect::<Vec<_>>().join("-")));
        let mut kubectl = std::process::Command::new(env.cp.bin_dir().join("kubectl"));
        kubectl
            .arg(format!("--kubeconfig={}", env.cp.kubeconfig("admin").display()))
            .args(["get", &format!("--raw=/debug/pprof/profile?seconds={seconds}")]);
        ApiserverProfile(Some(tokio::task::spawn_blocking(move || {
            let written = std::fs::create_dir_all(&dir).map_err(anyhow::Error::from).and_then(|()| {
                let output = kubectl.output()?;
                anyhow::ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr).trim());
                Ok(std::fs::write(&path, output.stdout)?)
            });
            match written {
                Ok(()) => println!("    kube-apiserver CPU profile ({seconds} s): {}", path.display()),
                Err(e) => eprintln!("bench: profiling kube-apiserver failed: {e}"),
            }
        })))
    }

    async fn finish(self) {
        if let Some(task) = self.0 {
            let _ = task.await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

async fn scenario_raw(env: &Env, n: usize, background: &BTreeMap<Key, f64>) -> Result<Outcome> {
    let ns = "bench-raw";
    println!("\n==> raw: the bench creates {n} Pods itself, {CONCURRENCY} at a time");
    env.cp.namespace(ns).await;
    let (watch, seen) = watch_pods(&env.admin, ns).await;
    let window = Window::open(&env.admin, None).await?;
    let cp_cpu = ControlPlaneCpu::now();
    let created: Created = Arc::default();
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), ns);
    let t0 = Instant::now();
    closed_loop(n, |i| {
        let (pods, created) = (pods.clone(), created.clone());
        async move {
            let name = format!("raw-{i:05}");
            created.lock().unwrap().started.insert(name.clone(), Instant::now());
            create(&pods, "pods", &pod_manifest(&name)).await.map(drop)
        }
    })
    .await?;
    let driver_done = t0.elapsed().as_secs_f64();
    seen.wait_for(n, timeout_for(0.1, n)).await;
    let mut outcome = finish("raw (client creates Pods)", n, &created, &seen, t0, "create → Pod seen");
    outcome.driver_done_seconds = Some(driver_done);
    outcome.add_control_plane_cpu(&cp_cpu);
    stop(watch).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    outcome.add_requests(&window.close(&env.admin, background).await?);
    cleanup_pods(env, ns, false).await?;
    Ok(outcome)
}

fn finish(scenario: &str, n: usize, created: &Created, seen: &Seen, t0: Instant, latency: &str) -> Outcome {
    let submissions = created.lock().unwrap();
    let seen = seen.snapshot();
    let (completed, wall, p50, p99) = latencies(&submissions.started, &seen, t0, n);
    let split = (!submissions.inputs_done.is_empty()).then(|| {
        let (_, _, inputs_p50, inputs_p99) = latencies(&submissions.started, &submissions.inputs_done, t0, n);
        let (_, _, after_p50, after_p99) = latencies(&submissions.inputs_done, &seen, t0, n);
        LatencySplit {
            inputs_p50_ms: inputs_p50,
            inputs_p99_ms: inputs_p99,
            after_inputs_p50_ms: after_p50,
            after_inputs_p99_ms: after_p99,
        }
    });
    drop(submissions);
    let mut outcome = Outcome {
        scenario: scenario.into(),
        n,
        completed,
        wall_seconds: wall,
        pods_per_second: wall.map(|w| n as f64 / w),
        p50_ms: p50,
        p99_ms: p99,
        latency: latency.into(),
        latency_split: split,
        ..Outcome::default()
    };
    if let Some(split) = &outcome.latency_split {
        outcome.notes.push(format!(
            "latency split p50/p99 ms: the driver's creates (job, then both votes) {}/{}, then to the Pod (scale: status) seen {}/{}",
            fmt_opt(split.inputs_p50_ms, 0),
            fmt_opt(split.inputs_p99_ms, 0),
            fmt_opt(split.after_inputs_p50_ms, 0),
            fmt_opt(split.after_inputs_p99_ms, 0)
        ));
    }
    if completed < n {
        outcome.notes.push(format!("TIMED OUT: only {completed} of {n} seen"));
    }
    println!(
        "    {completed}/{n} done; wall {}; p50 {} ms; p99 {} ms",
        wall.map_or("-".into(), |w| format!("{w:.2} s")),
        fmt_opt(p50, 0),
        fmt_opt(p99, 0)
    );
    outcome
}

async fn scenario_job_controller(
    env: &Env,
    n: usize,
    background: &BTreeMap<Key, f64>,
    scenario: &str,
    ns: &str,
    extra_args: &[&str],
    churn: Option<&busy::Churn>,
) -> Result<Outcome> {
    println!("\n==> {scenario}: kube-controller-manager --controllers=job {}; {n} Jobs", extra_args.join(" "));
    env.cp.namespace(ns).await;
    let kcm = ControllerManager::start_with_args(env.cp, "job", extra_args);
    // Warm up (informers synced, discovery done) with one Job in a namespace of its own.
    let warmup_ns = format!("{ns}-warmup");
    env.cp.namespace(&warmup_ns).await;
    {
        let (watch, seen) = watch_pods(&env.admin, &warmup_ns).await;
        create(&Api::<Job>::namespaced(env.admin.clone(), &warmup_ns), "jobs", &job_manifest("warmup")).await?;
        if seen.wait_for(1, Duration::from_secs(120)).await < 1 {
            bail!("kube-controller-manager created no Pod for the warm-up Job in 120 s; see {}", kcm.log_path().display());
        }
        stop(watch).await;
    }
    let (watch, seen) = watch_pods(&env.admin, ns).await;
    let window = Window::open(&env.admin, Some(kcm.pid())).await?;
    let cp_cpu = ControlPlaneCpu::now();
    let created: Created = Arc::default();
    let jobs: Api<Job> = Api::namespaced(env.admin.clone(), ns);
    let profile = ApiserverProfile::start(env, scenario);
    let t0 = Instant::now();
    closed_loop(n, |i| {
        let (jobs, created) = (jobs.clone(), created.clone());
        async move {
            let name = format!("job-{i:05}");
            created.lock().unwrap().started.insert(name.clone(), Instant::now());
            create(&jobs, "jobs", &job_manifest(&name)).await.map(drop)
        }
    })
    .await?;
    let driver_done = t0.elapsed().as_secs_f64();
    seen.wait_for(n, timeout_for(0.6, n)).await;
    let mut outcome = finish(scenario, n, &created, &seen, t0, "Job create → Pod seen");
    outcome.driver_done_seconds = Some(driver_done);
    if churn.is_some() {
        churn_notes(&mut outcome, churn);
    }
    outcome.settled_seconds = Some(settle(&env.admin, Duration::from_secs(60)).await?);
    outcome.add_control_plane_cpu(&cp_cpu);
    outcome.add_controller(window.controller_stats());
    drop(kcm);
    stop(watch).await;
    profile.finish().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    outcome.add_requests(&window.close(&env.admin, background).await?);
    for ns in [ns, warmup_ns.as_str()] {
        cleanup_pods(env, ns, true).await?;
        Api::<Job>::namespaced(env.admin.clone(), ns).delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
    }
    Ok(outcome)
}

/// Starts the operator for `namespace` and waits until its caches are synced.
async fn start_operator(env: &Env, namespace: &str) -> Result<OperatorProcess> {
    // The happy path is a configured namespace: with its meter keys Secret, an attempt's start
    // costs no `MeterKeysMissing` Warning Event (one write per job otherwise).
    let keys: k8s_openapi::api::core::v1::Secret = object(
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "agentgate-llm-keys"}, "stringData": {"openai": "sk-bench"}}),
    );
    match Api::namespaced(env.admin.clone(), namespace).create(&PostParams::default(), &keys).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e).context("creating the namespace's meter keys Secret"),
    }
    let operator = OperatorProcess::start(
        env.cp,
        &["--namespace", namespace, "--metrics-addr", "127.0.0.1:0", "--debug-memory", "--approval-floor", "2"],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(operator.log_path()).unwrap_or_default();
        if log.contains("watch caches synced") {
            return Ok(operator);
        }
        if Instant::now() > deadline {
            bail!("the operator did not sync its caches within 60 s; see {}", operator.log_path().display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `churn` set: the busy-cluster row, in its own namespace, with the churn's counts in its notes.
async fn scenario_agentgate(env: &Env, n: usize, background: &BTreeMap<Key, f64>, churn: Option<&busy::Churn>) -> Result<Outcome> {
    let (ns, scenario) = if churn.is_some() { ("bench-agentgate-busy", "agentgate (busy)") } else { ("bench-agentgate", "agentgate") };
    println!("\n==> {scenario}: {n} AgentJobs, each approved by alice and bob right after it is created");
    env.cp.namespace(ns).await;
    let mut operator = start_operator(env, ns).await?;
    println!("    operator log: {}", operator.log_path().display());
    let (watch, seen) = watch_pods(&env.admin, ns).await;
    let window = Window::open(&env.admin, Some(operator.pid())).await?;
    let cp_cpu = ControlPlaneCpu::now();
    let created: Created = Arc::default();
    let profile = ApiserverProfile::start(env, scenario);
    let t0 = Instant::now();
    closed_loop(n, |i| submit_agent_job(env, ns, format!("aj-{i:05}"), Kind::Approved, &created)).await?;
    let driver_done = t0.elapsed().as_secs_f64();
    seen.wait_for(n, timeout_for(0.3, n)).await;
    let mut outcome = finish(scenario, n, &created, &seen, t0, "AgentJob create → Pod seen (votes in between)");
    outcome.driver_done_seconds = Some(driver_done);
    churn_notes(&mut outcome, churn);
    outcome.settled_seconds = Some(settle(&env.admin, Duration::from_secs(60)).await?);
    outcome.add_control_plane_cpu(&cp_cpu);
    outcome.add_controller(window.controller_stats());
    if let Some(breakdown) = memory_breakdown(operator.pid()) {
        outcome.notes.push(format!("{breakdown} (once settled)"));
    }
    operator.kill();
    stop(watch).await;
    profile.finish().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    outcome.add_requests(&window.close(&env.admin, background).await?);
    cleanup_pods(env, ns, false).await?;
    Ok(outcome)
}

/// The agentgate workflow's own floor: the driver's creates (job + two votes, through CRD
/// validation and the admission policies) with no operator running.
async fn scenario_agentgate_inputs(env: &Env, n: usize, background: &BTreeMap<Key, f64>) -> Result<Outcome> {
    let ns = "bench-inputs";
    println!("\n==> agentgate inputs only: {n} AgentJobs plus two votes each, no operator running");
    env.cp.namespace(ns).await;
    let window = Window::open(&env.admin, None).await?;
    let cp_cpu = ControlPlaneCpu::now();
    let created: Created = Arc::default();
    let t0 = Instant::now();
    closed_loop(n, |i| submit_agent_job(env, ns, format!("in-{i:05}"), Kind::Approved, &created)).await?;
    let driver_done = t0.elapsed().as_secs_f64();
    println!("    {n} jobs and {} votes created in {driver_done:.2} s", 2 * n);
    let mut outcome = Outcome {
        scenario: "agentgate inputs, no operator".into(),
        n,
        completed: n,
        wall_seconds: Some(driver_done),
        driver_done_seconds: Some(driver_done),
        latency: "none: no Pods; the driver's job + 2 votes per job only".into(),
        ..Outcome::default()
    };
    outcome.notes.push(format!(
        "{:.1} jobs/s (each: create AgentJob, then alice's and bob's votes): the ceiling for the agentgate rows",
        n as f64 / driver_done
    ));
    outcome.add_control_plane_cpu(&cp_cpu);
    outcome.add_requests(&window.close(&env.admin, background).await?);
    Ok(outcome)
}

async fn scenario_steady(
    env: &Env,
    seconds: u64,
    rate: u64,
    background: &BTreeMap<Key, f64>,
    churn: Option<&busy::Churn>,
) -> Result<Outcome> {
    let (ns, scenario) =
        if churn.is_some() { ("bench-steady-busy", "agentgate steady (busy)") } else { ("bench-steady", "agentgate steady") };
    let n = (seconds * rate) as usize;
    println!("\n==> agentgate steady state: {rate} pre-approved AgentJobs/s for {seconds} s ({n} jobs)");
    env.cp.namespace(ns).await;
    let mut operator = start_operator(env, ns).await?;
    let (watch, seen) = watch_pods(&env.admin, ns).await;
    let window = Window::open(&env.admin, Some(operator.pid())).await?;
    let cp_cpu = ControlPlaneCpu::now();
    let created: Created = Arc::default();
    let env = Arc::new(Env { cp: env.cp, admin: env.admin.clone(), alice: env.alice.clone(), bob: env.bob.clone() });
    let profile = ApiserverProfile::start(&env, scenario);
    let t0 = Instant::now();
    // Open loop: one submission per tick whether or not earlier ones have finished.
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        ticks.tick().await;
        let (env, created) = (env.clone(), created.clone());
        tasks.push(tokio::spawn(async move { submit_agent_job(&env, ns, format!("steady-{i:05}"), Kind::Approved, &created).await }));
    }
    let submitted_in = t0.elapsed().as_secs_f64();
    for task in tasks {
        task.await??;
    }
    seen.wait_for(n, Duration::from_secs(120)).await;
    let mut outcome = finish(scenario, n, &created, &seen, t0, "AgentJob create → Pod seen at a fixed rate");
    outcome.driver_done_seconds = Some(submitted_in);
    churn_notes(&mut outcome, churn);
    outcome.settled_seconds = Some(settle(&env.admin, Duration::from_secs(60)).await?);
    outcome.notes.push(format!("offered {rate}/s; the last job was submitted {submitted_in:.1} s after the first"));
    outcome.add_control_plane_cpu(&cp_cpu);
    outcome.add_controller(window.controller_stats());
    operator.kill();
    stop(watch).await;
    profile.finish().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    outcome.add_requests(&window.close(&env.admin, background).await?);
    cleanup_pods(&env, ns, false).await?;
    Ok(outcome)
}

/// The load average when the row's last Pod was seen and, in a busy row, the churn so far.
fn churn_notes(outcome: &mut Outcome, churn: Option<&busy::Churn>) {
    outcome.notes.push(format!("load average (1/5/15 min) at the end: {}", busy::load_average()));
    if let Some(churn) = churn {
        outcome.notes.push(format!(
            "busy cluster: {} foreign Pods terminated and {} RBAC changes so far during the busy rows",
            churn.pods_terminated.load(std::sync::atomic::Ordering::Relaxed),
            churn.rbac_changes.load(std::sync::atomic::Ordering::Relaxed)
        ));
    }
}

fn scale_kind(i: usize) -> Kind {
    match i % 20 {
        0 => Kind::Approved,
        1 | 11 => Kind::OverBudget,
        _ => Kind::Unvoted,
    }
}

async fn scenario_scale(env: &Env, jobs: usize, background: &BTreeMap<Key, f64>) -> Result<Outcome> {
    let ns = "bench-scale";
    let kinds = |k: Kind| (0..jobs).filter(|&i| scale_kind(i) == k).count();
    let (approved, rejected, unvoted) = (kinds(Kind::Approved), kinds(Kind::OverBudget), kinds(Kind::Unvoted));
    println!("\n==> agentgate memory at scale: {jobs} AgentJobs ({unvoted} without votes, {rejected} over budget, {approved} approved)");
    env.cp.namespace(ns).await;
    let mut operator = start_operator(env, ns).await?;
    let pid = operator.pid();
    if let Some(report) = operator_memory_report(operator.log_path()).await {
        println!("    operator heap before any job:\n{}", report.lines().map(|l| format!("      {l}\n")).collect::<String>());
    }
    // A job counts once the operator has written status for its generation in the phase its
    // kind leads to.
    let seen = Seen::new();
    let recorder = seen.clone();
    let (watch, ready) = spawn_watch(Api::<AgentJob>::namespaced(env.admin.clone(), ns), "agentjobs", move |job: &AgentJob| {
        let Some(status) = &job.status else { return };
        if status.observed_generation != job.metadata.generation {
            return;
        }
        let name = job.name_any();
        let Some(i) = name.strip_prefix("scale-").and_then(|i| i.parse::<usize>().ok()) else { return };
        let done = match (scale_kind(i), status.phase) {
            (_, None) => false,
            (Kind::Unvoted, Some(p)) => p == JobPhase::AwaitingApproval,
            (Kind::OverBudget, Some(p)) => p == JobPhase::Rejected,
            (Kind::Approved, Some(p)) => p == JobPhase::Running || p == JobPhase::WaitingForResources,
        };
        if done {
            recorder.record(name);
        }
    });
    let _ = ready.await;
    let window = Window::open(&env.admin, Some(pid)).await?;
    let cp_cpu = ControlPlaneCpu::now();
    let created: Created = Arc::default();
    let t0 = Instant::now();
    closed_loop(jobs, |i| submit_agent_job(env, ns, format!("scale-{i:05}"), scale_kind(i), &created)).await?;
    let created_in = t0.elapsed().as_secs_f64();
    seen.wait_for(jobs, timeout_for(0.1, jobs)).await;
    let mut outcome = finish("agentgate scale", jobs, &created, &seen, t0, "AgentJob create → status written for it");
    outcome.pods_per_second = None;
    outcome.driver_done_seconds = Some(created_in);
    let at_completion = proc_stats(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    if let Some(breakdown) = memory_breakdown(pid) {
        outcome.notes.push(format!("{breakdown} (10 s after the last status)"));
    }
    if let Some(report) = operator_memory_report(operator.log_path()).await {
        println!("    operator heap (GET /debug/memory):\n{}", report.lines().map(|l| format!("      {l}\n")).collect::<String>());
        outcome.notes.extend(report.lines().map(|l| format!("heap: {l}")));
    }
    outcome.settled_seconds = Some(settle(&env.admin, Duration::from_secs(60)).await?);
    outcome.add_control_plane_cpu(&cp_cpu);
    outcome.add_controller(window.controller_stats());
    outcome.notes.push(format!("{unvoted} jobs without votes, {rejected} over budget, {approved} approved"));
    if let Some(s) = at_completion {
        outcome.notes.push(format!(
            "operator VmRSS {:.1} MiB when the last status was written; RSS column is 10 s later",
            s.rss_kib as f64 / 1024.0
        ));
    }
    operator.kill();
    stop(watch).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    outcome.add_requests(&window.close(&env.admin, background).await?);
    cleanup_pods(env, ns, false).await?;
    Ok(outcome)
}

/// Deletes every Pod in `namespace` (unscheduled Pods go at once), first lifting the Job
/// controller's tracking finalizer if asked: the controller that would lift it is stopped.
/// Keeps the cluster-wide Pod caches of later scenarios' controllers comparable.
async fn cleanup_pods(env: &Env, namespace: &str, strip_finalizers: bool) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), namespace);
    if strip_finalizers {
        let names: Vec<String> =
            pods.list(&ListParams::default()).await?.items.iter().filter(|p| !p.finalizers().is_empty()).map(|p| p.name_any()).collect();
        closed_loop(names.len(), |i| {
            let (pods, name) = (pods.clone(), names[i].clone());
            async move {
                pods.patch(&name, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await?;
                Ok(())
            }
        })
        .await?;
    }
    pods.delete_collection(&DeleteParams::default().grace_period(0), &ListParams::default()).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Targets and the report.

#[derive(Debug, Serialize)]
struct Target {
    target: String,
    measured: String,
    verdict: &'static str,
}

fn verdict(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "PASS",
        Some(false) => "MISS",
        None => "n/a",
    }
}

fn evaluate_targets(outcomes: &[Outcome]) -> Vec<Target> {
    let find = |prefix: &str| outcomes.iter().find(|o| o.scenario.starts_with(prefix));
    let exact = |name: &str| outcomes.iter().find(|o| o.scenario == name);
    let raw = find("raw").and_then(|o| o.pods_per_second);
    let tuned = find("job-controller (qps").and_then(|o| o.pods_per_second);
    let agentgate = exact("agentgate");
    let ag_rate = agentgate.and_then(|o| o.pods_per_second);
    let mut targets = Vec::new();
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let r = ratio(ag_rate, tuned);
    targets.push(Target {
        target: format!("agentgate Pods/s >= {TARGET_VS_JOB_CONTROLLER:.1}x job-controller (qps=1000)"),
        measured: format!("{} vs {} Pods/s = {}x", fmt_opt(ag_rate, 1), fmt_opt(tuned, 1), fmt_opt(r, 2)),
        verdict: verdict(r.map(|r| r >= TARGET_VS_JOB_CONTROLLER)),
    });
    let r = ratio(ag_rate, raw);
    targets.push(Target {
        target: format!("agentgate Pods/s >= {TARGET_VS_RAW:.1}x raw"),
        measured: format!("{} vs {} Pods/s = {}x", fmt_opt(ag_rate, 1), fmt_opt(raw, 1), fmt_opt(r, 2)),
        verdict: verdict(r.map(|r| r >= TARGET_VS_RAW)),
    });
    let steady = find("agentgate steady");
    let p99 = steady.filter(|o| o.completed == o.n).and_then(|o| o.p99_ms);
    targets.push(Target {
        target: format!("p99 apply→Pod < {TARGET_STEADY_P99_MS:.0} ms at the steady rate"),
        measured: match steady {
            None => "not run (STEADY_SECONDS=0 or SCENARIOS)".into(),
            Some(o) if o.completed < o.n => format!("only {}/{} Pods within the timeout", o.completed, o.n),
            Some(o) => format!("{} ms ({})", fmt_opt(o.p99_ms, 0), o.notes.join("; ")),
        },
        verdict: if steady.is_some_and(|o| o.completed < o.n) { "MISS" } else { verdict(p99.map(|p| p < TARGET_STEADY_P99_MS)) },
    });
    let all_writes = agentgate.and_then(|o| o.writes_per_job);
    let events = agentgate.and_then(|o| o.event_writes_per_job);
    // What the jobs cost: SubjectAccessReviews store nothing (a POST only by HTTP verb, answered
    // from RBAC and cached per head) and the leader Lease is renewed by the clock, not per job.
    let not_per_job = |o: &Outcome| {
        ["POST subjectaccessreviews", "PUT leases", "PATCH leases"]
            .iter()
            .map(|k| o.requests_per_job.get(*k).copied().unwrap_or(0.0))
            .sum::<f64>()
    };
    let job_writes = agentgate.and_then(|o| o.writes_per_job.map(|w| w - not_per_job(o)));
    targets.push(Target {
        target: format!("agentgate writes/job <= {TARGET_WRITES_PER_JOB:.0}, Events included"),
        measured: format!(
            "{} ({} of them Events; {} in all with SubjectAccessReviews and lease renewals)",
            fmt_opt(job_writes, 2),
            fmt_opt(events, 2),
            fmt_opt(all_writes, 2)
        ),
        // Within the printed precision: the idle background subtracted is itself a rate estimate.
        verdict: verdict(job_writes.map(|w| w <= TARGET_WRITES_PER_JOB + 0.005)),
    });
    // Informational: what a job costs the apiserver, against the Job controller's in the same run.
    let api = |o: Option<&Outcome>| o.and_then(|o| o.apiserver_cpu_ms_per_job);
    let (ag_api, jc_api, inputs_api) = (api(agentgate), api(find("job-controller (qps")), api(find("agentgate inputs")));
    targets.push(Target {
        target: "apiserver CPU ms/job: agentgate vs job-controller (qps=1000)".into(),
        measured: format!(
            "{} vs {} ms = {}x (the driver's job + 2 votes alone: {} ms)",
            fmt_opt(ag_api, 1),
            fmt_opt(jc_api, 1),
            fmt_opt(ratio(ag_api, jc_api), 2),
            fmt_opt(inputs_api, 1)
        ),
        verdict: "n/a",
    });
    let scale = find("agentgate scale");
    let rss = scale.filter(|o| o.completed == o.n).and_then(|o| o.rss_mib);
    targets.push(Target {
        target: format!("operator RSS <= {TARGET_SCALE_RSS_MIB:.0} MiB at the scale job count"),
        measured: match scale {
            None => "not run (SCALE_JOBS=0 or SCENARIOS)".into(),
            Some(o) => format!(
                "{} MiB at {} jobs (peak {} MiB){}",
                fmt_opt(o.rss_mib, 1),
                o.n,
                fmt_opt(o.peak_rss_mib, 1),
                if o.completed < o.n { " — status not written for all" } else { "" }
            ),
        },
        verdict: if scale.is_some_and(|o| o.completed < o.n) { "MISS" } else { verdict(rss.map(|r| r <= TARGET_SCALE_RSS_MIB)) },
    });
    targets
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.decimals$}"))
}

fn print_report(outcomes: &[Outcome], targets: &[Target], background: &BTreeMap<Key, f64>, busy_baseline: Option<&busy::Baseline>) {
    println!("\n== Results ==");
    println!(
        "{:<30} {:>6} {:>8} {:>8} {:>8} {:>8} {:>11} {:>20} {:>9} {:>7} {:>11}",
        "scenario", "N", "wall s", "pods/s", "p50 ms", "p99 ms", "writes/job", "reads/job L/W/G", "RSS MiB", "CPU s", "api ms/job"
    );
    for o in outcomes {
        let reads = match (o.lists_per_job, o.watches_per_job, o.gets_per_job) {
            (Some(l), Some(w), Some(g)) => format!("{l:.3}/{w:.3}/{g:.3}"),
            _ => "-".into(),
        };
        let wall = match o.wall_seconds {
            Some(w) => format!("{w:.2}"),
            None => format!("{}/{}!", o.completed, o.n),
        };
        println!(
            "{:<30} {:>6} {:>8} {:>8} {:>8} {:>8} {:>11} {:>20} {:>9} {:>7} {:>11}",
            o.scenario,
            o.n,
            wall,
            fmt_opt(o.pods_per_second, 1),
            fmt_opt(o.p50_ms, 0),
            fmt_opt(o.p99_ms, 0),
            fmt_opt(o.writes_per_job, 2),
            reads,
            fmt_opt(o.peak_rss_mib, 1),
            fmt_opt(o.controller_cpu_seconds, 2),
            fmt_opt(o.apiserver_cpu_ms_per_job, 1),
        );
    }
    println!(
        "API requests are apiserver requests minus the driver's: the apiserver_request_total delta over the scenario minus the\n\
         requests the bench driver sent itself (counted client-side; the metric has no user-agent label) minus the idle\n\
         background ({:.2} req/s); non-resource requests are listed below but not in the columns. They include the controller's watch connections, which the apiserver counts when they\n\
         close (the controller is stopped before the final scrape). RSS is the controller's peak (VmHWM); CPU s is its\n\
         utime+stime during the scenario. writes/job counts every write, Events included. p50/p99 are from just before each object's create call to its Pod first seen by a\n\
         watch (scale: to its status first seen). The raw row's controller is the bench itself (RSS/CPU not measured).\n\
         api ms/job is kube-apiserver's utime+stime (/proc/<pid>/stat) over the scenario, the driver's own requests included,\n\
         minus its idle rate measured at startup ({:.0} ms/s), per job.",
        background.values().fold(0.0, |sum, v| sum + v),
        *APISERVER_IDLE_CPU.lock().unwrap() * 1000.0
    );
    for o in outcomes {
        let mut notes = o.notes.clone();
        if let Some(d) = o.driver_done_seconds {
            notes.push(format!("the driver finished its creates {d:.2} s after the first"));
        }
        if o.driver_throttled > 0 {
            notes.push(format!(
                "the driver's creates got {} × 429 from API Priority and Fairness (alice/bob are not exempt; admin and so the controllers are) and were retried after 1 s",
                o.driver_throttled
            ));
        }
        if let Some(settled) = o.settled_seconds.filter(|s| *s > 1.5) {
            notes.push(format!("the controller kept the apiserver busy for {settled:.0} s more after the last Pod/status was seen (scale: after a 10 s pause); counted"));
        }
        if let (Some(a), Some(e)) = (o.apiserver_cpu_seconds, o.etcd_cpu_seconds) {
            notes.push(format!(
                "kube-apiserver {a:.1} CPU s ({:.1} ms/job), etcd {e:.1} CPU s during the scenario",
                a * 1000.0 / o.n as f64
            ));
        }
        if !o.requests_per_job.is_empty() && o.scenario != "raw (client creates Pods)" {
            let top: Vec<String> = {
                let mut v: Vec<(&String, &f64)> = o.requests_per_job.iter().filter(|(_, v)| **v >= 0.005).collect();
                v.sort_by(|a, b| b.1.total_cmp(a.1));
                v.into_iter().map(|(k, v)| format!("{k} {v:.2}")).collect()
            };
            notes.push(format!("requests/job by others: {}", top.join(", ")));
        }
        if o.n > 0 && o.scenario.starts_with("agentgate") && !o.scenario.starts_with("agentgate inputs") {
            let writes: Vec<String> = o
                .requests_per_job
                .iter()
                .filter(|(k, v)| **v >= 0.005 && k.split_once(' ').is_some_and(|(verb, what)| is_write(verb) && !what.starts_with('/')))
                .map(|(k, v)| format!("{k} {v:.2}"))
                .collect();
            notes.push(format!("writes/job by kind: {}", writes.join(", ")));
        }
        if !o.errors_per_job.is_empty() {
            let errors: Vec<String> = o.errors_per_job.iter().map(|(k, v)| format!("{k} {v:.3}")).collect();
            notes.push(format!("error responses/job (anyone's): {}", errors.join(", ")));
        }
        if !notes.is_empty() {
            println!("  {}:", o.scenario);
            for note in notes {
                println!("    - {note}");
            }
        }
    }
    let busy_rows: Vec<&Outcome> = outcomes.iter().filter(|o| o.scenario.ends_with(" (busy)")).collect();
    if !busy_rows.is_empty() {
        println!("\n== Busy cluster next to empty (goal: within 10%) ==");
        println!(
            "{:<26} {:>16} {:>14} {:>14} {:>12} {:>16} {:>14}",
            "scenario", "pods/s", "p50 ms", "p99 ms", "writes/job", "controller CPU s", "api ms/job"
        );
        for b in busy_rows {
            // The busy Job controller is the tuned one (qps=1000): the yardstick.
            let base = match b.scenario.trim_end_matches(" (busy)") {
                "job-controller" => "job-controller (qps=1000)",
                agentgate => agentgate,
            };
            let Some(e) = outcomes.iter().find(|o| o.scenario == base) else { continue };
            let pair = |e: Option<f64>, b: Option<f64>, d: usize| format!("{} / {}", fmt_opt(e, d), fmt_opt(b, d));
            println!(
                "{:<26} {:>16} {:>14} {:>14} {:>12} {:>16} {:>14}",
                base,
                pair(e.pods_per_second, b.pods_per_second, 1),
                pair(e.p50_ms, b.p50_ms, 0),
                pair(e.p99_ms, b.p99_ms, 0),
                pair(e.writes_per_job, b.writes_per_job, 2),
                pair(e.controller_cpu_seconds, b.controller_cpu_seconds, 2),
                pair(e.apiserver_cpu_ms_per_job, b.apiserver_cpu_ms_per_job, 1),
            );
        }
        println!("(each cell: empty / busy; a busy row's api ms/job is net of the busy cluster's own rate below)");
        if let Some(baseline) = busy_baseline {
            println!("{}", baseline.summary());
        }
    }
    println!("\n== Targets ==");
    for t in targets {
        println!("  [{}] {:<58} measured: {}", t.verdict, t.target, t.measured);
    }
}

fn write_json(
    settings: &Settings,
    outcomes: &[Outcome],
    targets: &[Target],
    background: &BTreeMap<Key, f64>,
    busy_baseline: Option<&busy::Baseline>,
    elapsed: Duration,
) -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("results.json");
    let background: BTreeMap<String, f64> = background
        .iter()
        .map(|((verb, resource, sub), v)| (format!("{verb} {resource}{}{sub}", if sub.is_empty() { "" } else { "/" }), *v))
        .collect();
    let doc = json!({
        "settings": {"n": settings.n, "steadySeconds": settings.steady_seconds, "steadyRate": settings.steady_rate, "scaleJobs": settings.scale_jobs, "scenarios": settings.only,
                     "concurrency": CONCURRENCY, "operator": std::env::var("AGENTGATE_BIN").ok()},
        "machine": {"cpus": std::thread::available_parallelism().map(|n| n.get()).ok()},
        "requestsNote": "apiserver requests minus the driver's: apiserver_request_total delta minus the bench driver's own requests minus the idle background rate",
        "backgroundRequestsPerSecond": background,
        "busyBaseline": busy_baseline,
        "scenarios": outcomes,
        "targets": targets,
        "elapsedSeconds": elapsed.as_secs_f64(),
    });
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
    println!("\nwrote {}", path.display());
    Ok(())
}
