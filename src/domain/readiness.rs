//! Is the infrastructure in place for this job? Tools, credentials, node capacity and quota,
//! decided over plain snapshots of the watch caches.

use std::collections::BTreeMap;

use crate::api::ReadinessCheck;

/// What the job needs from one tool.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolNeed {
    pub name: String,
    pub required: bool,
    pub min_rate_limit: i32,
}

/// A tool as the AgentTool cache shows it.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ToolView {
    pub ready: bool,
    /// Why the tool is not ready, from its status.
    pub not_ready_reason: Option<String>,
    pub rate_limit: i32,
    /// Calls per minute claimed by other running jobs, and how many jobs claim them.
    pub in_use: i32,
    pub in_use_by_jobs: usize,
    /// `None` when the tool declares no credentials.
    pub credentials_present: Option<bool>,
}

/// CPU in millicores, memory in bytes, extended resources (GPUs) in whole units.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_milli: i128,
    pub memory_bytes: i128,
    pub extended: BTreeMap<String, i128>,
}

impl Resources {
    pub fn fits_in(&self, free: &Resources) -> bool {
        self.cpu_milli <= free.cpu_milli
            && self.memory_bytes <= free.memory_bytes
            && self.extended.iter().all(|(k, v)| *v <= free.extended.get(k).copied().unwrap_or(0))
    }

    pub fn subtract(&mut self, used: &Resources) {
        self.cpu_milli -= used.cpu_milli;
        self.memory_bytes -= used.memory_bytes;
        for (k, v) in &used.extended {
            *self.extended.entry(k.clone()).or_default() -= v;
        }
    }
}

/// A node's capacity left for new Pods: allocatable minus requests of its non-terminal Pods.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub schedulable: bool,
    pub free: Resources,
}

/// A ResourceQuota in the job's namespace; quantities in thousandths (as parsed).
#[derive(Clone, Debug, PartialEq)]
pub struct QuotaView {
    pub name: String,
    pub hard: BTreeMap<String, i128>,
    pub used: BTreeMap<String, i128>,
}

/// One agent Pod's requests; a job runs `pods` of them.
#[derive(Clone, Debug, PartialEq)]
pub struct PodNeed {
    pub per_pod: Resources,
    pub pods: usize,
    /// Extended resource that may be dropped when it is the only thing missing.
    pub optional_gpu: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Readiness {
    pub checks: Vec<ReadinessCheck>,
    pub missing_tools: Vec<String>,
    pub insufficient_resources: Vec<String>,
    /// Optional resources the job will run without.
    pub dropped: Vec<String>,
    /// The first blocking problem as a condition reason, `None` when ready.
    pub blocked_reason: Option<&'static str>,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.blocked_reason.is_none()
    }

    fn record(&mut self, name: impl Into<String>, passed: bool, message: impl Into<String>, blocks: Option<&'static str>) {
        self.checks.push(ReadinessCheck { name: name.into(), passed, message: message.into() });
        if !passed && self.blocked_reason.is_none() {
            self.blocked_reason = blocks;
        }
    }
}

pub struct ReadinessInput<'a> {
    pub tools: &'a [(ToolNeed, Option<ToolView>)],
    pub need: &'a PodNeed,
    pub nodes: &'a [NodeView],
    /// Pods of higher-priority jobs that wait for capacity: placed before this job's.
    pub queued_ahead: &'a [PodNeed],
    pub quotas: &'a [QuotaView],
}

pub fn check(input: &ReadinessInput) -> Readiness {
    let mut r = Readiness::default();
    for (need, view) in input.tools {
        check_tool(&mut r, need, view.as_ref());
    }
    check_nodes(&mut r, input);
    let dropped = r.dropped.clone();
    check_quotas(&mut r, input.need, input.quotas, &dropped);
    r
}

fn check_tool(r: &mut Readiness, need: &ToolNeed, view: Option<&ToolView>) {
    let kind = if need.required { "required" } else { "optional" };
    let blocks = need.required.then_some("ToolsNotReady");
    let check_name = format!("tool/{}", need.name);
    let Some(view) = view else {
        r.missing_tools.push(need.name.clone());
        r.record(check_name, false, format!("{kind} tool {} has no AgentTool", need.name), blocks);
        return;
    };
    if !view.ready {
        let why = view.not_ready_reason.as_deref().unwrap_or("not Ready");
        r.missing_tools.push(need.name.clone());
        r.record(check_name, false, format!("{kind} tool {} is not ready: {why}", need.name), blocks);
        return;
    }
    if view.credentials_present == Some(false) {
        r.record(
            format!("credentials/{}", need.name),
            false,
            format!("credentials Secret of {kind} tool {} is missing", need.name),
            need.required.then_some("CredentialsMissing"),
        );
        return;
    }
    if need.min_rate_limit > view.rate_limit {
        r.record(
            check_name,
            false,
            format!("{kind} tool {} allows {} calls/min in all, the job needs {}", need.name, view.rate_limit, need.min_rate_limit),
            need.required.then_some("RateLimitTooLow"),
        );
        return;
    }
    let spare = view.rate_limit - view.in_use;
    if need.min_rate_limit > spare {
        r.record(
            check_name,
            false,
            format!(
                "{kind} tool {} has {spare} of {} calls/min spare ({} in use by {} running job(s)), the job needs {}",
                need.name, view.rate_limit, view.in_use, view.in_use_by_jobs, need.min_rate_limit
            ),
            need.required.then_some("RateLimitExhausted"),
        );
        return;
    }
    r.record(check_name, true, format!("{kind} tool {} is ready with {spare} calls/min spare", need.name), None);
}

/// Free capacity after placing `queued_ahead` first-fit, highest priority first.
fn capacity_after_queue(nodes: &[NodeView], queued_ahead: &[PodNeed]) -> Vec<Resources> {
    let mut free: Vec<Resources> = nodes.iter().filter(|n| n.schedulable).map(|n| n.free.clone()).collect();
    for job in queued_ahead {
        for _ in 0..job.pods {
            if let Some(slot) = free.iter_mut().find(|f| job.per_pod.fits_in(f)) {
                slot.subtract(&job.per_pod);
            }
        }
    }
    free
}

fn check_nodes(r: &mut Readiness, input: &ReadinessInput) {
    let need = input.need;
    let free = capacity_after_queue(input.nodes, input.queued_ahead);
    if free.iter().any(|f| need.per_pod.fits_in(f)) {
        let ahead = if input.queued_ahead.is_empty() { String::new() } else { format!(" after {} higher-priority job(s)", input.queued_ahead.len()) };
        r.record("nodes", true, format!("a schedulable node fits one agent Pod{ahead}"), None);
        return;
    }
    if let Some(gpu) = &need.optional_gpu {
        let mut without = need.per_pod.clone();
        without.extended.remove(gpu);
        if free.iter().any(|f| without.fits_in(f)) {
            r.dropped.push("gpu".into());
            r.record("nodes", true, format!("no node has {gpu} free; running without the optional GPU"), None);
            return;
        }
    }
    let mut short = Vec::new();
    let best = |get: &dyn Fn(&Resources) -> i128| free.iter().map(get).max().unwrap_or(0);
    if best(&|f| f.cpu_milli) < need.per_pod.cpu_milli {
        short.push("cpu".to_string());
    }
    if best(&|f| f.memory_bytes) < need.per_pod.memory_bytes {
        short.push("memory".to_string());
    }
    for (name, want) in &need.per_pod.extended {
        if best(&|f| f.extended.get(name).copied().unwrap_or(0)) < *want {
            short.push(name.clone());
        }
    }
    if short.is_empty() {
        short.push("cpu+memory on one node".to_string());
    }
    let schedulable = input.nodes.iter().filter(|n| n.schedulable).count();
    let message = format!(
        "none of {schedulable} schedulable node(s) has room for one agent Pod (cpu {}m, memory {}Mi{}): short of {}{}",
        need.per_pod.cpu_milli,
        need.per_pod.memory_bytes / (1024 * 1024),
        need.per_pod.extended.iter().map(|(k, v)| format!(", {k} {v}")).collect::<String>(),
        short.join(", "),
        if input.queued_ahead.is_empty() { String::new() } else { format!(" after {} higher-priority job(s)", input.queued_ahead.len()) },
    );
    r.insufficient_resources.extend(short);
    r.record("nodes", false, message, Some("InsufficientResources"));
}

fn check_quotas(r: &mut Readiness, need: &PodNeed, quotas: &[QuotaView], dropped: &[String]) {
    let pods = need.pods as i128;
    let mut asks: Vec<(String, i128)> = vec![
        ("pods".into(), pods * 1000),
        ("cpu".into(), pods * need.per_pod.cpu_milli),
        ("requests.cpu".into(), pods * need.per_pod.cpu_milli),
        ("limits.cpu".into(), pods * need.per_pod.cpu_milli),
        ("memory".into(), pods * need.per_pod.memory_bytes * 1000),
        ("requests.memory".into(), pods * need.per_pod.memory_bytes * 1000),
        ("limits.memory".into(), pods * need.per_pod.memory_bytes * 1000),
    ];
    for (name, count) in &need.per_pod.extended {
        if !(dropped.iter().any(|d| d == "gpu") && need.optional_gpu.as_deref() == Some(name)) {
            asks.push((format!("requests.{name}"), pods * count * 1000));
        }
    }
    for quota in quotas {
        let over: Vec<String> = asks
            .iter()
            .filter_map(|(key, ask)| {
                let hard = *quota.hard.get(key)?;
                let used = quota.used.get(key).copied().unwrap_or(0);
                (used + ask > hard).then(|| format!("{key} (used {}, hard {}, job needs {})", show(key, used), show(key, hard), show(key, *ask)))
            })
            .collect();
        if over.is_empty() {
            r.record(format!("quota/{}", quota.name), true, format!("ResourceQuota {} leaves room", quota.name), None);
        } else {
            r.insufficient_resources.push(format!("quota/{}", quota.name));
            r.record(format!("quota/{}", quota.name), false, format!("ResourceQuota {} is exhausted: {}", quota.name, over.join("; ")), Some("QuotaExceeded"));
        }
    }
}

/// Renders a thousandths amount the way `kubectl describe quota` would.
fn show(key: &str, milli: i128) -> String {
    if key.contains("cpu") {
        format!("{milli}m")
    } else if key.contains("memory") {
        format!("{}Mi", milli / 1000 / (1024 * 1024))
    } else {
        format!("{}", milli / 1000)
    }
}
