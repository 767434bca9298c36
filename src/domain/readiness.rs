//! Is the infrastructure in place for this job? Tools, credentials, node capacity and quota,
//! decided over plain snapshots of the watch caches.

use std::collections::BTreeMap;

use crate::api::{ReadinessCheck, Text};

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
    /// Calls per minute that approved, higher-priority jobs waiting for capacity will claim from
    /// this tool, most urgent first: held back from this job so it cannot starve them.
    pub queued_ahead: Vec<i32>,
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

    pub fn add(&mut self, more: &Resources) {
        self.cpu_milli += more.cpu_milli;
        self.memory_bytes += more.memory_bytes;
        for (k, v) in &more.extended {
            *self.extended.entry(k.clone()).or_default() += v;
        }
    }

    /// Each resource the larger of the two.
    pub fn max_each(&mut self, other: &Resources) {
        self.cpu_milli = self.cpu_milli.max(other.cpu_milli);
        self.memory_bytes = self.memory_bytes.max(other.memory_bytes);
        for (k, v) in &other.extended {
            let mine = self.extended.entry(k.clone()).or_default();
            *mine = (*mine).max(*v);
        }
    }

    fn is_zero(&self) -> bool {
        self.cpu_milli == 0 && self.memory_bytes == 0 && self.extended.values().all(|v| *v == 0)
    }
}

/// A Pod's requests as the scheduler and the ResourceQuota admission count them (Kubernetes'
/// `resource.PodRequests` with native sidecars, KEP-753): the app containers and the sidecars
/// (init containers with `restartPolicy: Always`) run together, so they add up; an ordinary init
/// container runs beside only the sidecars started before it; the Pod needs the larger of the
/// two, resource by resource. `init` is in the Pod's order, `true` marking a sidecar.
pub fn effective_requests(app: &[Resources], init: &[(Resources, bool)]) -> Resources {
    let mut together = Resources::default();
    for container in app {
        together.add(container);
    }
    let mut sidecars_so_far = Resources::default();
    let mut init_peak = Resources::default();
    for (container, sidecar) in init {
        let running = if *sidecar {
            together.add(container);
            sidecars_so_far.add(container);
            sidecars_so_far.clone()
        } else {
            let mut running = container.clone();
            running.add(&sidecars_so_far);
            running
        };
        init_peak.max_each(&running);
    }
    together.max_each(&init_peak);
    together
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
    /// The whole Pod's, sidecar included ([`effective_requests`]).
    pub per_pod: Resources,
    pub pods: usize,
    /// Extended resource that may be dropped when it is the only thing missing.
    pub optional_gpu: Option<String>,
    /// The meter sidecar's share of `per_pod`, named in the messages: a job that would fit
    /// without it is told why it does not.
    pub sidecar: Resources,
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

    fn record(&mut self, name: impl Into<Text>, passed: bool, message: impl Into<Text>, blocks: Option<&'static str>) {
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
    // What higher-priority waiting jobs will claim is held for them, even while it does not fit
    // yet: otherwise smaller jobs could keep a large urgent one waiting forever. A claim above the
    // tool's whole rate limit can never be met and holds nothing.
    let held: Vec<i32> = view.queued_ahead.iter().copied().filter(|c| *c > 0 && *c <= view.rate_limit).collect();
    let held_sum = held.iter().fold(0i32, |sum, c| sum.saturating_add(*c));
    let held_note =
        if held.is_empty() { String::new() } else { format!("{held_sum} held for {} higher-priority waiting job(s)", held.len()) };
    let spare = view.rate_limit.saturating_sub(view.in_use).saturating_sub(held_sum).max(0);
    if need.min_rate_limit > spare {
        let held_part = if held.is_empty() { String::new() } else { format!(", {held_note}") };
        r.record(
            check_name,
            false,
            format!(
                "{kind} tool {} has {spare} of {} calls/min spare ({} in use by {} running job(s){held_part}), the job needs {}",
                need.name, view.rate_limit, view.in_use, view.in_use_by_jobs, need.min_rate_limit
            ),
            need.required.then_some("RateLimitExhausted"),
        );
        return;
    }
    let held_part = if held.is_empty() { String::new() } else { format!(" ({held_note})") };
    r.record(check_name, true, format!("{kind} tool {} is ready with {spare} calls/min spare{held_part}", need.name), None);
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
        let ahead = if input.queued_ahead.is_empty() {
            String::new()
        } else {
            format!(" after {} higher-priority job(s)", input.queued_ahead.len())
        };
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
    let sidecar = if need.sidecar.is_zero() {
        String::new()
    } else {
        format!(
            ", of which the {} sidecar cpu {}m, memory {}Mi",
            super::meter_sidecar::CONTAINER,
            need.sidecar.cpu_milli,
            need.sidecar.memory_bytes / (1024 * 1024)
        )
    };
    let message = format!(
        "none of {schedulable} schedulable node(s) has room for one agent Pod (cpu {}m, memory {}Mi{}{sidecar}): short of {}{}",
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
    // (key, what the job asks, the sidecars' part of it), in thousandths. Limits equal requests
    // in every container the operator builds.
    let (cpu, memory) = (need.per_pod.cpu_milli, need.per_pod.memory_bytes * 1000);
    let (sidecar_cpu, sidecar_memory) = (need.sidecar.cpu_milli, need.sidecar.memory_bytes * 1000);
    let mut asks: Vec<(String, i128, i128)> = vec![("pods".into(), pods * 1000, 0)];
    for key in ["cpu", "requests.cpu", "limits.cpu"] {
        asks.push((key.into(), pods * cpu, pods * sidecar_cpu));
    }
    for key in ["memory", "requests.memory", "limits.memory"] {
        asks.push((key.into(), pods * memory, pods * sidecar_memory));
    }
    for (name, count) in &need.per_pod.extended {
        if !(dropped.iter().any(|d| d == "gpu") && need.optional_gpu.as_deref() == Some(name)) {
            asks.push((format!("requests.{name}"), pods * count * 1000, 0));
        }
    }
    for quota in quotas {
        let over: Vec<String> = asks
            .iter()
            .filter_map(|(key, ask, sidecars)| {
                let hard = *quota.hard.get(key)?;
                let used = quota.used.get(key).copied().unwrap_or(0);
                let of_which = if *sidecars > 0 {
                    format!(", {} of it for the {} sidecars", show(key, *sidecars), super::meter_sidecar::CONTAINER)
                } else {
                    String::new()
                };
                (used + ask > hard)
                    .then(|| format!("{key} (used {}, hard {}, job needs {}{of_which})", show(key, used), show(key, hard), show(key, *ask)))
            })
            .collect();
        if over.is_empty() {
            r.record(format!("quota/{}", quota.name), true, format!("ResourceQuota {} leaves room", quota.name), None);
        } else {
            r.insufficient_resources.push(format!("quota/{}", quota.name));
            r.record(
                format!("quota/{}", quota.name),
                false,
                format!("ResourceQuota {} is exhausted: {}", quota.name, over.join("; ")),
                Some("QuotaExceeded"),
            );
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: i128 = 1024 * 1024;
    const GPU: &str = "nvidia.com/gpu";

    fn res(cpu_milli: i128, memory_mib: i128, extended: &[(&str, i128)]) -> Resources {
        Resources { cpu_milli, memory_bytes: memory_mib * MIB, extended: extended.iter().map(|(k, v)| (k.to_string(), *v)).collect() }
    }

    fn node(name: &str, schedulable: bool, free: Resources) -> NodeView {
        NodeView { name: name.into(), schedulable, free }
    }

    fn pods(per_pod: Resources, pods: usize) -> PodNeed {
        PodNeed { per_pod, pods, optional_gpu: None, sidecar: Resources::default() }
    }

    fn optional_gpu(per_pod: Resources, resource: &str) -> PodNeed {
        PodNeed { per_pod, pods: 1, optional_gpu: Some(resource.into()), sidecar: Resources::default() }
    }

    /// Agent Pods of `agent` with the 100m / 64Mi meter sidecar, as the operator builds them.
    fn with_meter(agent: Resources, pods: usize) -> PodNeed {
        let sidecar = res(100, 64, &[]);
        PodNeed { per_pod: effective_requests(&[agent], &[(sidecar.clone(), true)]), pods, optional_gpu: None, sidecar }
    }

    fn tool(name: &str, required: bool, min_rate_limit: i32) -> ToolNeed {
        ToolNeed { name: name.into(), required, min_rate_limit }
    }

    fn ready_tool(rate_limit: i32) -> ToolView {
        ToolView { ready: true, rate_limit, ..ToolView::default() }
    }

    /// Quota amounts in the units a manifest uses: pods and GPUs whole, cpu in millicores,
    /// memory in MiB; stored in thousandths like the parsed ResourceQuota.
    fn quota(name: &str, hard: &[(&str, i128)], used: &[(&str, i128)]) -> QuotaView {
        let milli = |(key, v): &(&str, i128)| {
            let value = if key.contains("cpu") {
                *v
            } else if key.contains("memory") {
                v * MIB * 1000
            } else {
                v * 1000
            };
            (key.to_string(), value)
        };
        QuotaView { name: name.into(), hard: hard.iter().map(milli).collect(), used: used.iter().map(milli).collect() }
    }

    struct Input {
        tools: Vec<(ToolNeed, Option<ToolView>)>,
        need: PodNeed,
        nodes: Vec<NodeView>,
        queued_ahead: Vec<PodNeed>,
        quotas: Vec<QuotaView>,
    }

    /// One agent Pod of 500m / 512Mi and one roomy node: ready unless a case says otherwise.
    impl Default for Input {
        fn default() -> Self {
            Input {
                tools: Vec::new(),
                need: pods(res(500, 512, &[]), 1),
                nodes: vec![node("n1", true, res(4000, 8192, &[]))],
                queued_ahead: Vec::new(),
                quotas: Vec::new(),
            }
        }
    }

    struct Case {
        name: &'static str,
        input: Input,
        blocked: Option<&'static str>,
        missing_tools: &'static [&'static str],
        insufficient: &'static [&'static str],
        dropped: &'static [&'static str],
        /// Every check in order: name, passed, fragments its message must contain.
        checks: &'static [(&'static str, bool, &'static [&'static str])],
    }

    const NODES_OK: (&str, bool, &[&str]) = ("nodes", true, &["a schedulable node fits one agent Pod"]);

    fn cases() -> Vec<Case> {
        vec![
            Case {
                name: "nothing needed beyond a node: ready",
                input: Input::default(),
                blocked: None,
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[NODES_OK],
            },
            Case {
                name: "required tool without an AgentTool blocks",
                input: Input { tools: vec![(tool("scanner", true, 10), None)], ..Input::default() },
                blocked: Some("ToolsNotReady"),
                missing_tools: &["scanner"],
                insufficient: &[],
                dropped: &[],
                checks: &[("tool/scanner", false, &["required tool scanner has no AgentTool"]), NODES_OK],
            },
            Case {
                name: "optional tool without an AgentTool fails its check but not the job",
                input: Input { tools: vec![(tool("imgproc", false, 10), None)], ..Input::default() },
                blocked: None,
                missing_tools: &["imgproc"],
                insufficient: &[],
                dropped: &[],
                checks: &[("tool/imgproc", false, &["optional tool imgproc has no AgentTool"]), NODES_OK],
            },
            Case {
                name: "required tool not ready says why",
                input: Input {
                    tools: vec![(
                        tool("scanner", true, 10),
                        Some(ToolView { ready: false, not_ready_reason: Some("no ready endpoints".into()), ..ready_tool(60) }),
                    )],
                    ..Input::default()
                },
                blocked: Some("ToolsNotReady"),
                missing_tools: &["scanner"],
                insufficient: &[],
                dropped: &[],
                checks: &[("tool/scanner", false, &["required tool scanner is not ready: no ready endpoints"]), NODES_OK],
            },
            Case {
                name: "tool not ready without a reason",
                input: Input {
                    tools: vec![(tool("scanner", true, 10), Some(ToolView { ready: false, ..ready_tool(60) }))],
                    ..Input::default()
                },
                blocked: Some("ToolsNotReady"),
                missing_tools: &["scanner"],
                insufficient: &[],
                dropped: &[],
                checks: &[("tool/scanner", false, &["is not ready: not Ready"]), NODES_OK],
            },
            Case {
                name: "required tool with its credentials Secret missing",
                input: Input {
                    tools: vec![(tool("scanner", true, 10), Some(ToolView { credentials_present: Some(false), ..ready_tool(60) }))],
                    ..Input::default()
                },
                blocked: Some("CredentialsMissing"),
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[("credentials/scanner", false, &["credentials Secret of required tool scanner is missing"]), NODES_OK],
            },
            Case {
                name: "optional tool with its credentials Secret missing only warns",
                input: Input {
                    tools: vec![(tool("imgproc", false, 10), Some(ToolView { credentials_present: Some(false), ..ready_tool(60) }))],
                    ..Input::default()
                },
                blocked: None,
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[("credentials/imgproc", false, &["optional tool imgproc is missing"]), NODES_OK],
            },
            Case {
                name: "tool with credentials present and spare rate limit passes",
                input: Input {
                    tools: vec![(
                        tool("scanner", true, 10),
                        Some(ToolView { credentials_present: Some(true), in_use: 20, in_use_by_jobs: 2, ..ready_tool(60) }),
                    )],
                    ..Input::default()
                },
                blocked: None,
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[("tool/scanner", true, &["required tool scanner is ready with 40 calls/min spare"]), NODES_OK],
            },
            Case {
                name: "rateLimit lower than minRateLimit can never be met",
                input: Input { tools: vec![(tool("scanner", true, 10), Some(ready_tool(5)))], ..Input::default() },
                blocked: Some("RateLimitTooLow"),
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[("tool/scanner", false, &["allows 5 calls/min in all, the job needs 10"]), NODES_OK],
            },
            Case {
                name: "rate limit exhausted by other running jobs",
                input: Input {
                    tools: vec![(tool("scanner", true, 10), Some(ToolView { in_use: 55, in_use_by_jobs: 3, ..ready_tool(60) }))],
                    ..Input::default()
                },
                blocked: Some("RateLimitExhausted"),
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[
                    ("tool/scanner", false, &["has 5 of 60 calls/min spare", "55 in use by 3 running job(s)", "the job needs 10"]),
                    NODES_OK,
                ],
            },
            Case {
                name: "spare rate limit exactly the minimum is enough",
                input: Input {
                    tools: vec![(tool("scanner", true, 10), Some(ToolView { in_use: 50, in_use_by_jobs: 1, ..ready_tool(60) }))],
                    ..Input::default()
                },
                blocked: None,
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[("tool/scanner", true, &["10 calls/min spare"]), NODES_OK],
            },
            Case {
                name: "optional tool with its rate limit exhausted does not block",
                input: Input {
                    tools: vec![(tool("imgproc", false, 20), Some(ToolView { in_use: 50, in_use_by_jobs: 1, ..ready_tool(60) }))],
                    ..Input::default()
                },
                blocked: None,
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[("tool/imgproc", false, &["optional tool imgproc has 10 of 60 calls/min spare"]), NODES_OK],
            },
            Case {
                name: "a higher-priority waiting job's claim is held back from the spare rate limit",
                input: Input {
                    tools: vec![(tool("scanner", true, 5), Some(ToolView { queued_ahead: vec![8], ..ready_tool(10) }))],
                    ..Input::default()
                },
                blocked: Some("RateLimitExhausted"),
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[
                    (
                        "tool/scanner",
                        false,
                        &[
                            "has 2 of 10 calls/min spare",
                            "0 in use by 0 running job(s), 8 held for 1 higher-priority waiting job(s)",
                            "the job needs 5",
                        ],
                    ),
                    NODES_OK,
                ],
            },
            Case {
                name: "what is held counts even when the job ahead does not fit yet, so it cannot be starved",
                input: Input {
                    tools: vec![(
                        tool("scanner", true, 5),
                        Some(ToolView { in_use: 5, in_use_by_jobs: 1, queued_ahead: vec![8], ..ready_tool(10) }),
                    )],
                    ..Input::default()
                },
                blocked: Some("RateLimitExhausted"),
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[
                    (
                        "tool/scanner",
                        false,
                        &["has 0 of 10 calls/min spare", "5 in use by 1 running job(s), 8 held for 1 higher-priority waiting job(s)"],
                    ),
                    NODES_OK,
                ],
            },
            Case {
                name: "claims held for several jobs ahead add up with running ones",
                input: Input {
                    tools: vec![(
                        tool("scanner", true, 3),
                        Some(ToolView { in_use: 3, in_use_by_jobs: 1, queued_ahead: vec![2, 3], ..ready_tool(10) }),
                    )],
                    ..Input::default()
                },
                blocked: Some("RateLimitExhausted"),
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[
                    (
                        "tool/scanner",
                        false,
                        &["has 2 of 10 calls/min spare", "3 in use by 1 running job(s), 5 held for 2 higher-priority waiting job(s)"],
                    ),
                    NODES_OK,
                ],
            },
            Case {
                name: "spare rate limit left after the jobs ahead is enough",
                input: Input {
                    tools: vec![(
                        tool("scanner", true, 5),
                        Some(ToolView { in_use: 2, in_use_by_jobs: 1, queued_ahead: vec![8, 5], ..ready_tool(20) }),
                    )],
                    ..Input::default()
                },
                blocked: None,
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[
                    ("tool/scanner", true, &["is ready with 5 calls/min spare (13 held for 2 higher-priority waiting job(s))"]),
                    NODES_OK,
                ],
            },
            Case {
                name: "a claim above the tool's whole rate limit can never run and holds nothing",
                input: Input {
                    tools: vec![(tool("scanner", true, 5), Some(ToolView { queued_ahead: vec![50, 0], ..ready_tool(10) }))],
                    ..Input::default()
                },
                blocked: None,
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[("tool/scanner", true, &["is ready with 10 calls/min spare"]), NODES_OK],
            },
            Case {
                name: "an optional tool whose spare is held for jobs ahead only warns",
                input: Input {
                    tools: vec![(tool("imgproc", false, 5), Some(ToolView { queued_ahead: vec![10], ..ready_tool(10) }))],
                    ..Input::default()
                },
                blocked: None,
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[
                    (
                        "tool/imgproc",
                        false,
                        &["optional tool imgproc has 0 of 10 calls/min spare", "10 held for 1 higher-priority waiting job(s)"],
                    ),
                    NODES_OK,
                ],
            },
            Case {
                name: "a job needing no rate limit is never held back",
                input: Input {
                    tools: vec![(
                        tool("scanner", true, 0),
                        Some(ToolView { in_use: 10, in_use_by_jobs: 2, queued_ahead: vec![10], ..ready_tool(10) }),
                    )],
                    ..Input::default()
                },
                blocked: None,
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[("tool/scanner", true, &["is ready with 0 calls/min spare"]), NODES_OK],
            },
            Case {
                name: "the first blocking problem is the reason; later ones are still listed",
                input: Input {
                    tools: vec![(tool("scanner", true, 10), None)],
                    nodes: vec![node("n1", true, res(100, 8192, &[]))],
                    ..Input::default()
                },
                blocked: Some("ToolsNotReady"),
                missing_tools: &["scanner"],
                insufficient: &["cpu"],
                dropped: &[],
                checks: &[("tool/scanner", false, &["has no AgentTool"]), ("nodes", false, &["short of cpu"])],
            },
            Case {
                name: "no schedulable nodes at all",
                input: Input { nodes: vec![], ..Input::default() },
                blocked: Some("InsufficientResources"),
                missing_tools: &[],
                insufficient: &["cpu", "memory"],
                dropped: &[],
                checks: &[("nodes", false, &["none of 0 schedulable node(s)", "cpu 500m, memory 512Mi", "short of cpu, memory"])],
            },
            Case {
                name: "cpu short on every node",
                input: Input {
                    nodes: vec![node("n1", true, res(400, 8192, &[])), node("n2", true, res(250, 8192, &[]))],
                    ..Input::default()
                },
                blocked: Some("InsufficientResources"),
                missing_tools: &[],
                insufficient: &["cpu"],
                dropped: &[],
                checks: &[("nodes", false, &["none of 2 schedulable node(s)", "short of cpu"])],
            },
            Case {
                name: "memory short on every node",
                input: Input { nodes: vec![node("n1", true, res(4000, 256, &[]))], ..Input::default() },
                blocked: Some("InsufficientResources"),
                missing_tools: &[],
                insufficient: &["memory"],
                dropped: &[],
                checks: &[("nodes", false, &["short of memory"])],
            },
            Case {
                name: "cpu on one node and memory on another is not room for one Pod",
                input: Input {
                    nodes: vec![node("n1", true, res(4000, 256, &[])), node("n2", true, res(100, 8192, &[]))],
                    ..Input::default()
                },
                blocked: Some("InsufficientResources"),
                missing_tools: &[],
                insufficient: &["cpu+memory on one node"],
                dropped: &[],
                checks: &[("nodes", false, &["short of cpu+memory on one node"])],
            },
            Case {
                name: "required GPU short names the GPU resource",
                input: Input { need: pods(res(500, 512, &[(GPU, 1)]), 1), ..Input::default() },
                blocked: Some("InsufficientResources"),
                missing_tools: &[],
                insufficient: &[GPU],
                dropped: &[],
                checks: &[("nodes", false, &["nvidia.com/gpu 1", "short of nvidia.com/gpu"])],
            },
            Case {
                name: "GPU under a custom resource name",
                input: Input {
                    need: pods(res(500, 512, &[("amd.com/gpu", 2)]), 1),
                    nodes: vec![node("n1", true, res(4000, 8192, &[("amd.com/gpu", 1), (GPU, 4)]))],
                    ..Input::default()
                },
                blocked: Some("InsufficientResources"),
                missing_tools: &[],
                insufficient: &["amd.com/gpu"],
                dropped: &[],
                checks: &[("nodes", false, &["short of amd.com/gpu"])],
            },
            Case {
                name: "GPU available: required GPU fits",
                input: Input {
                    need: pods(res(500, 512, &[(GPU, 1)]), 1),
                    nodes: vec![node("n1", true, res(4000, 8192, &[(GPU, 1)]))],
                    ..Input::default()
                },
                blocked: None,
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[NODES_OK],
            },
            Case {
                name: "optional GPU is dropped when it is the only thing missing",
                input: Input { need: optional_gpu(res(500, 512, &[(GPU, 1)]), GPU), ..Input::default() },
                blocked: None,
                missing_tools: &[],
                insufficient: &[],
                dropped: &["gpu"],
                checks: &[("nodes", true, &["no node has nvidia.com/gpu free; running without the optional GPU"])],
            },
            Case {
                name: "optional GPU is kept when a node has one",
                input: Input {
                    need: optional_gpu(res(500, 512, &[(GPU, 1)]), GPU),
                    nodes: vec![node("n1", true, res(4000, 8192, &[(GPU, 2)]))],
                    ..Input::default()
                },
                blocked: None,
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[NODES_OK],
            },
            Case {
                name: "optional GPU with cpu short as well: not ready and nothing dropped",
                input: Input {
                    need: optional_gpu(res(500, 512, &[(GPU, 1)]), GPU),
                    nodes: vec![node("n1", true, res(100, 8192, &[]))],
                    ..Input::default()
                },
                blocked: Some("InsufficientResources"),
                missing_tools: &[],
                insufficient: &["cpu", GPU],
                dropped: &[],
                checks: &[("nodes", false, &["short of cpu, nvidia.com/gpu"])],
            },
            Case {
                name: "an unschedulable node's room is ignored",
                input: Input {
                    nodes: vec![node("cordoned", false, res(64000, 262144, &[])), node("small", true, res(250, 8192, &[]))],
                    ..Input::default()
                },
                blocked: Some("InsufficientResources"),
                missing_tools: &[],
                insufficient: &["cpu"],
                dropped: &[],
                checks: &[("nodes", false, &["none of 1 schedulable node(s)"])],
            },
            Case {
                name: "higher-priority jobs queued ahead take the capacity first",
                input: Input {
                    nodes: vec![node("n1", true, res(2000, 8192, &[]))],
                    queued_ahead: vec![pods(res(1000, 1024, &[]), 2)],
                    ..Input::default()
                },
                blocked: Some("InsufficientResources"),
                missing_tools: &[],
                insufficient: &["cpu"],
                dropped: &[],
                checks: &[("nodes", false, &["short of cpu after 1 higher-priority job(s)"])],
            },
            Case {
                name: "capacity left after the queue ahead is enough",
                input: Input {
                    nodes: vec![node("n1", true, res(2000, 8192, &[])), node("n2", true, res(1000, 2048, &[]))],
                    queued_ahead: vec![pods(res(1000, 1024, &[]), 2)],
                    ..Input::default()
                },
                blocked: None,
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[("nodes", true, &["fits one agent Pod after 1 higher-priority job(s)"])],
            },
            Case {
                name: "a queued job that fits nowhere takes nothing",
                input: Input {
                    nodes: vec![node("n1", true, res(1000, 8192, &[]))],
                    queued_ahead: vec![pods(res(8000, 1024, &[]), 1)],
                    ..Input::default()
                },
                blocked: None,
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[("nodes", true, &["after 1 higher-priority job(s)"])],
            },
            Case {
                name: "quota with room passes",
                input: Input {
                    quotas: vec![quota(
                        "team",
                        &[("pods", 10), ("requests.cpu", 4000), ("requests.memory", 8192)],
                        &[("pods", 2), ("requests.cpu", 1000)],
                    )],
                    ..Input::default()
                },
                blocked: None,
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[NODES_OK, ("quota/team", true, &["ResourceQuota team leaves room"])],
            },
            Case {
                name: "a node that fits the agent but not its meter sidecar: waits, naming the sidecar's share",
                // 950m agent + 100m sidecar = 1050m on a 1000m node.
                input: Input {
                    need: with_meter(res(950, 512, &[]), 1),
                    nodes: vec![node("n1", true, res(1000, 8192, &[]))],
                    ..Input::default()
                },
                blocked: Some("InsufficientResources"),
                missing_tools: &[],
                insufficient: &["cpu"],
                dropped: &[],
                checks: &[(
                    "nodes",
                    false,
                    &["cpu 1050m, memory 576Mi, of which the agentgate-meter sidecar cpu 100m, memory 64Mi", "short of cpu"],
                )],
            },
            Case {
                name: "a node with room for the agent and its sidecar fits",
                input: Input {
                    need: with_meter(res(900, 512, &[]), 1),
                    nodes: vec![node("n1", true, res(1000, 8192, &[]))],
                    ..Input::default()
                },
                blocked: None,
                missing_tools: &[],
                insufficient: &[],
                dropped: &[],
                checks: &[NODES_OK],
            },
            Case {
                name: "a quota that fits the agents but not their meter sidecars: waits, naming the sidecars' share",
                // Two Pods of 450m + 100m = 1100m against 1000m; 900m without the sidecars.
                input: Input {
                    need: with_meter(res(450, 256, &[]), 2),
                    quotas: vec![quota("team", &[("requests.cpu", 1000), ("requests.memory", 4096)], &[])],
                    ..Input::default()
                },
                blocked: Some("QuotaExceeded"),
                missing_tools: &[],
                insufficient: &["quota/team"],
                dropped: &[],
                checks: &[
                    NODES_OK,
                    (
                        "quota/team",
                        false,
                        &["requests.cpu (used 0m, hard 1000m, job needs 1100m, 200m of it for the agentgate-meter sidecars)"],
                    ),
                ],
            },
            Case {
                name: "quota out of pods",
                input: Input { quotas: vec![quota("team", &[("pods", 2)], &[("pods", 2)])], ..Input::default() },
                blocked: Some("QuotaExceeded"),
                missing_tools: &[],
                insufficient: &["quota/team"],
                dropped: &[],
                checks: &[NODES_OK, ("quota/team", false, &["ResourceQuota team is exhausted", "pods (used 2, hard 2, job needs 1)"])],
            },
            Case {
                name: "quota out of cpu counts every agent Pod",
                input: Input {
                    need: pods(res(500, 512, &[]), 3),
                    quotas: vec![quota("team", &[("requests.cpu", 2000), ("cpu", 8000)], &[("requests.cpu", 1000)])],
                    ..Input::default()
                },
                blocked: Some("QuotaExceeded"),
                missing_tools: &[],
                insufficient: &["quota/team"],
                dropped: &[],
                checks: &[NODES_OK, ("quota/team", false, &["requests.cpu (used 1000m, hard 2000m, job needs 1500m)"])],
            },
            Case {
                name: "quota out of memory limits",
                input: Input {
                    need: pods(res(500, 512, &[]), 2),
                    quotas: vec![quota("mem", &[("limits.memory", 2048)], &[("limits.memory", 1536)])],
                    ..Input::default()
                },
                blocked: Some("QuotaExceeded"),
                missing_tools: &[],
                insufficient: &["quota/mem"],
                dropped: &[],
                checks: &[NODES_OK, ("quota/mem", false, &["limits.memory (used 1536Mi, hard 2048Mi, job needs 1024Mi)"])],
            },
            Case {
                name: "quota out of GPUs",
                input: Input {
                    need: pods(res(500, 512, &[(GPU, 1)]), 1),
                    nodes: vec![node("n1", true, res(4000, 8192, &[(GPU, 1)]))],
                    quotas: vec![quota("gpus", &[("requests.nvidia.com/gpu", 1)], &[("requests.nvidia.com/gpu", 1)])],
                    ..Input::default()
                },
                blocked: Some("QuotaExceeded"),
                missing_tools: &[],
                insufficient: &["quota/gpus"],
                dropped: &[],
                checks: &[NODES_OK, ("quota/gpus", false, &["requests.nvidia.com/gpu (used 1, hard 1, job needs 1)"])],
            },
            Case {
                name: "quota ignores an optional GPU the job runs without",
                input: Input {
                    need: optional_gpu(res(500, 512, &[(GPU, 1)]), GPU),
                    quotas: vec![quota("gpus", &[("requests.nvidia.com/gpu", 0)], &[])],
                    ..Input::default()
                },
                blocked: None,
                missing_tools: &[],
                insufficient: &[],
                dropped: &["gpu"],
                checks: &[("nodes", true, &["running without the optional GPU"]), ("quota/gpus", true, &["leaves room"])],
            },
            Case {
                name: "each quota is its own check; one exhausted one blocks",
                input: Input {
                    quotas: vec![quota("roomy", &[("pods", 100)], &[]), quota("tight", &[("requests.cpu", 400)], &[])],
                    ..Input::default()
                },
                blocked: Some("QuotaExceeded"),
                missing_tools: &[],
                insufficient: &["quota/tight"],
                dropped: &[],
                checks: &[
                    NODES_OK,
                    ("quota/roomy", true, &[]),
                    ("quota/tight", false, &["requests.cpu (used 0m, hard 400m, job needs 500m)"]),
                ],
            },
        ]
    }

    #[test]
    fn a_pods_requests_count_sidecars_as_the_scheduler_does() {
        let (agent, meter) = (res(500, 512, &[(GPU, 1)]), res(100, 64, &[]));
        // App containers and sidecars run together: they add up.
        assert_eq!(effective_requests(std::slice::from_ref(&agent), &[(meter.clone(), true)]), res(600, 576, &[(GPU, 1)]));
        assert_eq!(effective_requests(&[agent.clone(), agent.clone()], &[]), res(1000, 1024, &[(GPU, 2)]));
        // An ordinary init container runs alone, beside the sidecars started before it only:
        // the Pod needs the larger, resource by resource.
        let setup = res(2000, 100, &[]);
        assert_eq!(effective_requests(std::slice::from_ref(&agent), &[(setup.clone(), false)]), res(2000, 512, &[(GPU, 1)]));
        assert_eq!(
            effective_requests(std::slice::from_ref(&agent), &[(meter.clone(), true), (setup.clone(), false)]),
            res(2100, 576, &[(GPU, 1)]),
            "the setup runs beside the meter started before it"
        );
        assert_eq!(
            effective_requests(std::slice::from_ref(&agent), &[(setup, false), (meter.clone(), true)]),
            res(2000, 576, &[(GPU, 1)]),
            "a sidecar started after it does not run beside it"
        );
        assert_eq!(effective_requests(&[], &[(meter.clone(), true), (meter, true)]), res(200, 128, &[]));
        assert_eq!(effective_requests(&[], &[]), Resources::default());
    }

    #[test]
    fn readiness_table() {
        let cases = cases();
        assert!(cases.len() >= 15);
        for case in cases {
            let name = case.name;
            let i = &case.input;
            let r = check(&ReadinessInput {
                tools: &i.tools,
                need: &i.need,
                nodes: &i.nodes,
                queued_ahead: &i.queued_ahead,
                quotas: &i.quotas,
            });
            assert_eq!(r.blocked_reason, case.blocked, "{name}: blocked_reason; checks {:#?}", r.checks);
            assert_eq!(r.ready(), case.blocked.is_none(), "{name}: ready()");
            assert_eq!(r.missing_tools, case.missing_tools, "{name}: missing_tools");
            assert_eq!(r.insufficient_resources, case.insufficient, "{name}: insufficient_resources");
            assert_eq!(r.dropped, case.dropped, "{name}: dropped");
            let got: Vec<(&str, bool)> = r.checks.iter().map(|c| (c.name.as_str(), c.passed)).collect();
            let want: Vec<(&str, bool)> = case.checks.iter().map(|(n, p, _)| (*n, *p)).collect();
            assert_eq!(got, want, "{name}: checks (name, passed)");
            for (check, (_, _, fragments)) in r.checks.iter().zip(case.checks) {
                for fragment in *fragments {
                    assert!(
                        check.message.contains(fragment),
                        "{name}: check {} message {:?} lacks {fragment:?}",
                        check.name,
                        check.message
                    );
                }
            }
        }
    }
}
