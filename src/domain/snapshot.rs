//! Dereference: turns cached Kubernetes objects into the domain's plain views.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod, ResourceQuota, ResourceRequirements};
use kube::ResourceExt;

use crate::api::{AgentJob, AgentTool, ApprovalVote, JobPhase};
use crate::domain::decide::{PodState, PodView};
use crate::domain::pod_builder::{
    ANNOTATION_JOB_GENERATION, DEFAULT_CPU, DEFAULT_MEMORY, LABEL_AGENT, LABEL_ATTEMPT, LABEL_JOB, LABEL_JOB_UID, USAGE_FINALIZER,
    is_agent_pod_name,
};
use crate::domain::quantity::{parse_milli, parse_units};
use crate::domain::readiness::{NodeView, PodNeed, QuotaView, Resources, ToolView, effective_requests};
use crate::domain::tally::VoteView;

pub fn pod_view(pod: &Pod) -> Option<PodView> {
    let labels = pod.labels();
    let attempt = labels.get(LABEL_ATTEMPT)?.parse().ok()?;
    let agent = labels.get(LABEL_AGENT)?.clone();
    let status = pod.status.as_ref();
    let terminated = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == "agent"))
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    let message = terminated.and_then(|t| t.message.clone());
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let state = match phase {
        "Succeeded" => PodState::Succeeded { message },
        "Failed" => {
            let reason = status
                .and_then(|s| s.reason.clone())
                // The kubelet's reason when it names a cause (OOMKilled, ContainerCannotRun), not
                // the generic "Error".
                .or_else(|| {
                    terminated.map(|t| match t.reason.as_deref() {
                        Some(reason) if !reason.is_empty() && reason != "Error" => format!("{reason} (exit code {})", t.exit_code),
                        _ => format!("exit code {}", t.exit_code),
                    })
                })
                .unwrap_or_else(|| "Failed".into());
            PodState::Failed { reason, message }
        }
        _ => PodState::Active,
    };
    let generation = pod.annotations().get(ANNOTATION_JOB_GENERATION).and_then(|g| g.parse().ok());
    Some(PodView { name: pod.name_any(), agent, attempt, generation, state, meter: pod_meter(pod) })
}

/// What a Pod's status says of its meter: whether it ran, and the termination messages of its
/// stopped processes (the last one, and the one before a restart). Read from the status alone,
/// which the cache keeps of the meter (controller/slim.rs). Messages that are not a meter's are
/// no figure and left out (domain/meter_message.rs).
pub fn pod_meter(pod: &Pod) -> crate::domain::meter_message::PodMeter {
    use crate::domain::meter_sidecar::CONTAINER;
    use k8s_openapi::api::core::v1::ContainerState;
    let containers: Vec<_> = pod
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| c.name == CONTAINER)
        .collect();
    let statuses: Vec<_> = containers.iter().flat_map(|c| [c.state.as_ref(), c.last_state.as_ref()]).flatten().collect();
    // One process, stopped on its own with exit code 0 (domain/meter_message.rs PodMeter).
    let exited_cleanly = matches!(containers.as_slice(), [c] if c.restart_count == 0
        && c.state.as_ref().and_then(|s| s.terminated.as_ref()).is_some_and(|t| t.exit_code == 0));
    // Running, or stopped after it had started (a container the kubelet never started is
    // reported terminated without a start, e.g. `ContainerStatusUnknown`).
    let started = |s: &&ContainerState| s.running.is_some() || s.terminated.as_ref().is_some_and(|t| t.started_at.is_some());
    let messages = statuses
        .iter()
        .filter_map(|state| state.terminated.as_ref()?.message.as_deref())
        .filter_map(|text| crate::domain::meter_message::parse(text).ok())
        .collect();
    crate::domain::meter_message::PodMeter { ran: statuses.iter().any(started), messages, exited_cleanly }
}

/// The uid of the AgentJob that controls the Pod: its controller ownerReference, never a label.
pub fn pod_controller_job_uid(pod: &Pod) -> Option<&str> {
    pod.owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .filter(|o| o.kind == "AgentJob" && o.api_version.starts_with("agentgate.dev/"))
        .map(|o| o.uid.as_str())
}

/// Whether the Pod is one of the job's: in the job's namespace and controlled by the job's uid.
/// Labels alone prove nothing (anyone who may create a Pod may set them; the admission policy
/// in deploy/admission/pods.yaml refuses that, this holds where it is missing): a Pod elsewhere
/// or owned by something else is never read, adopted or counted (tests/gate_attacks.rs).
pub fn is_job_pod(pod: &Pod, namespace: &str, job_uid: &str) -> bool {
    pod.metadata.namespace.as_deref() == Some(namespace) && pod_controller_job_uid(pod) == Some(job_uid)
}

/// A Pod that carries the job's uid label but is not one of its Pods: a decoy, reported, never read.
pub fn claims_job_falsely(pod: &Pod, namespace: &str, job_uid: &str) -> bool {
    labelled_job_uid(pod) == Some(job_uid) && !is_job_pod(pod, namespace, job_uid)
}

/// The job a Pod says it is an agent Pod of, by its labels: (job name, job uid), when every job
/// label is there and the Pod's name is the one the operator gives that job's Pod of that agent
/// and attempt. Only the operator makes Pods with these labels and nobody may change them where
/// deploy/admission/pods.yaml is installed; elsewhere they are a claim, proving nothing.
pub fn labelled_job(pod: &Pod) -> Option<(&str, &str)> {
    let labels = pod.labels();
    let (job, uid, agent) = (labels.get(LABEL_JOB)?, labels.get(LABEL_JOB_UID)?, labels.get(LABEL_AGENT)?);
    let attempt = labels.get(LABEL_ATTEMPT)?.parse().ok()?;
    let name = pod.metadata.name.as_deref()?;
    is_agent_pod_name(name, job, agent, attempt).then_some((job.as_str(), uid.as_str()))
}

/// An agent Pod of the job that lost its controller ownerReference: in the job's namespace,
/// labelled and named as the job's Pod, still holding the usage-tracking finalizer (which only
/// the operator may remove), and controlled by no AgentJob (the owner removed, or replaced by an
/// owner of another kind). Only where the policy is missing could such a Pod be anyone else's,
/// and then only a Pod of the job's own namespace, whose writers could as well have given it the
/// job's ownerReference: taking it back trusts it no more than `is_job_pod` trusts an owner.
/// A Pod carrying the labels elsewhere, or without the finalizer, is never taken
/// (tests/gate_attacks.rs an_agent_pod_stripped_of_its_owner_is_taken_back_not_left_running_beside_a_retry).
pub fn lost_job_pod(pod: &Pod, namespace: &str, job_name: &str, job_uid: &str) -> bool {
    pod.metadata.namespace.as_deref() == Some(namespace)
        && pod_controller_job_uid(pod).is_none()
        && pod.finalizers().iter().any(|f| f == USAGE_FINALIZER)
        && labelled_job(pod) == Some((job_name, job_uid))
}

/// The job uid a Pod's label names.
pub fn labelled_job_uid(pod: &Pod) -> Option<&str> {
    pod.labels().get(LABEL_JOB_UID).map(String::as_str)
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

/// A Pod whose requests count against its node: bound there and not finished.
pub fn holds_node_resources(pod: &Pod) -> bool {
    !is_terminal(pod) && pod.spec.as_ref().is_some_and(|s| s.node_name.is_some())
}

/// What the scheduler reserves for a Pod: its containers' requests, native sidecars and init
/// containers counted as the scheduler counts them ([`effective_requests`]), plus its overhead.
pub fn pod_requests(pod: &Pod) -> Resources {
    let Some(spec) = pod.spec.as_ref() else { return Resources::default() };
    let app: Vec<Resources> = spec.containers.iter().map(|c| container_requests(c.resources.as_ref())).collect();
    let init: Vec<(Resources, bool)> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| (container_requests(c.resources.as_ref()), c.restart_policy.as_deref() == Some("Always")))
        .collect();
    let mut r = effective_requests(&app, &init);
    if let Some(overhead) = &spec.overhead {
        add_quantities(&mut r, overhead);
    }
    r
}

/// One container's requests; a resource with a limit and no request requests its limit (the
/// apiserver's defaulting, which a Pod read back has already had).
pub fn container_requests(resources: Option<&ResourceRequirements>) -> Resources {
    let mut r = Resources::default();
    let Some(resources) = resources else { return r };
    let mut list = resources.limits.clone().unwrap_or_default();
    list.extend(resources.requests.clone().unwrap_or_default());
    add_quantities(&mut r, &list);
    r
}

fn add_quantities(r: &mut Resources, list: &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>) {
    for (name, q) in list {
        match name.as_str() {
            "cpu" => r.cpu_milli += parse_milli(&q.0).unwrap_or(0),
            "memory" => r.memory_bytes += parse_units(&q.0).unwrap_or(0),
            "ephemeral-storage" | "pods" => {}
            other if other.starts_with("hugepages-") => {}
            other => *r.extended.entry(other.to_string()).or_default() += parse_units(&q.0).unwrap_or(0),
        }
    }
}

/// Nodes with what is left on them: allocatable minus the requests of non-terminal Pods bound there.
pub fn node_views(nodes: &[std::sync::Arc<Node>], pods: &[std::sync::Arc<Pod>]) -> Vec<NodeView> {
    let mut used: BTreeMap<String, Resources> = BTreeMap::new();
    for pod in pods.iter().filter(|p| holds_node_resources(p)) {
        if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()) {
            let requests = pod_requests(pod);
            let entry = used.entry(node.clone()).or_default();
            entry.cpu_milli += requests.cpu_milli;
            entry.memory_bytes += requests.memory_bytes;
            for (k, v) in requests.extended {
                *entry.extended.entry(k).or_default() += v;
            }
        }
    }
    nodes.iter().map(|node| node_view(node, used.get(&node.name_any()))).collect()
}

/// A node with what is left on it, given the requests `used` by the Pods that hold resources
/// there (the operator keeps those per node: controller/index.rs).
pub fn node_view(node: &Node, used: Option<&Resources>) -> NodeView {
    let mut free = Resources::default();
    if let Some(alloc) = node.status.as_ref().and_then(|s| s.allocatable.as_ref()) {
        add_quantities(&mut free, alloc);
    }
    if let Some(u) = used {
        free.subtract(u);
    }
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let cordoned = node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
    let no_schedule_taint = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| ts.iter().any(|t| t.effect == "NoSchedule" || t.effect == "NoExecute"));
    NodeView { name: node.name_any(), schedulable: ready && !cordoned && !no_schedule_taint, free }
}

pub fn quota_views(quotas: &[std::sync::Arc<ResourceQuota>], namespace: &str) -> Vec<QuotaView> {
    let thousandths = |m: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>| -> BTreeMap<String, i128> {
        m.map(|m| m.iter().filter_map(|(k, q)| Some((k.clone(), parse_milli(&q.0)?))).collect()).unwrap_or_default()
    };
    quotas
        .iter()
        .filter(|q| q.namespace().as_deref() == Some(namespace))
        .map(|q| QuotaView {
            name: q.name_any(),
            hard: thousandths(q.status.as_ref().and_then(|s| s.hard.as_ref()).or(q.spec.as_ref().and_then(|s| s.hard.as_ref()))),
            used: thousandths(q.status.as_ref().and_then(|s| s.used.as_ref())),
        })
        .collect()
}

/// What each Pod of the job asks for: the agent's `resources` (the Pod builder's defaults
/// without them) and the meter sidecar's, counted as the scheduler counts them. `None` when the
/// spec's quantities don't parse (the schema prevents that, so it can only mean an outdated CRD).
pub fn pod_need(job: &AgentJob) -> Option<PodNeed> {
    let spec = &job.spec;
    let pods = 1 + spec.agents.supporting.len();
    let (cpu, memory) = spec.resources.as_ref().map_or((DEFAULT_CPU, DEFAULT_MEMORY), |r| (r.cpu.as_str(), r.memory.as_str()));
    let mut agent = Resources { cpu_milli: parse_milli(cpu)?, memory_bytes: parse_units(memory)?, extended: BTreeMap::new() };
    let gpu_name = gpu_resource_name(job);
    if let Some(gpu) = spec.resources.as_ref().and_then(|r| r.gpu).filter(|g| *g > 0) {
        agent.extended.insert(gpu_name.clone(), i128::from(gpu));
    }
    let optional_gpu = spec.resources.as_ref().is_some_and(|r| r.optional.contains(&crate::api::OptionalResource::Gpu)).then_some(gpu_name);
    let sidecar = container_requests(Some(&crate::domain::meter_sidecar::resources()));
    let per_pod = effective_requests(&[agent], &[(sidecar.clone(), true)]);
    Some(PodNeed { per_pod, pods, optional_gpu, sidecar })
}

pub fn gpu_resource_name(job: &AgentJob) -> String {
    job.spec
        .resources
        .as_ref()
        .and_then(|r| r.gpu_resource_name.clone())
        .unwrap_or_else(|| crate::domain::pod_builder::DEFAULT_GPU_RESOURCE.to_string())
}

/// A tool with its spare capacity, seen by `job`: `in_use` counts the claims of running jobs
/// other than `job`, `queued_ahead` the claims of jobs waiting ahead of it.
pub fn tool_view(tool: &AgentTool, jobs: &[std::sync::Arc<AgentJob>], job: &AgentJob) -> ToolView {
    let status = tool.status.clone().unwrap_or_default();
    let (in_use, in_use_by_jobs) = rate_limit_claims(jobs, &tool.name_any(), job.metadata.uid.as_deref());
    let condition = |t: &str| status.conditions.iter().find(|c| c.type_ == t);
    ToolView {
        ready: status.ready,
        not_ready_reason: condition("Ready").filter(|c| c.status != "True").map(|c| c.message.to_string()),
        rate_limit: tool.spec.rate_limit,
        in_use,
        in_use_by_jobs,
        credentials_present: tool.spec.credentials.as_ref().map(|_| condition("CredentialsPresent").is_some_and(|c| c.status == "True")),
        queued_ahead: rate_limit_claims_ahead(jobs, job, &tool.name_any()),
    }
}

/// Readiness reasons of a job that waits for capacity to free up (node room, quota, rate limit)
/// rather than for something to be fixed.
const CAPACITY_WAITS: [&str; 3] = ["RateLimitExhausted", "InsufficientResources", "QuotaExceeded"];

/// Where a job stands in the queue for capacity: lower spec.priority first, then older, then by
/// namespace and name so that the order is total.
pub fn queue_key(job: &AgentJob) -> (i32, Option<k8s_openapi::jiff::Timestamp>, String, String) {
    (
        job.spec.priority.unwrap_or(500),
        job.metadata.creation_timestamp.as_ref().map(|t| t.0),
        job.namespace().unwrap_or_default(),
        job.name_any(),
    )
}

/// An approved job that waits only for capacity: it holds what it will claim against jobs behind
/// it. A job that waits for something to be fixed (a required tool missing or not ready,
/// credentials, a rate limit that can never be met) holds nothing, or it would block others for
/// as long as nobody fixes it.
pub fn waits_for_capacity(job: &AgentJob) -> bool {
    use crate::domain::conditions::find;
    use crate::domain::decide::condition::{APPROVED, INFRASTRUCTURE_READY};
    let Some(s) = job.status.as_ref() else { return false };
    s.phase == Some(JobPhase::WaitingForResources)
        && find(&s.conditions, APPROVED).is_some_and(|c| c.status == "True")
        && find(&s.conditions, INFRASTRUCTURE_READY).is_some_and(|c| c.status == "False" && CAPACITY_WAITS.contains(&c.reason.as_str()))
        && !job.spec.tools.iter().any(|t| t.required && s.missing_tools.contains(&t.name))
}

/// Whether a job ahead in the queue holds what it will claim (rate limit, node room) against
/// `behind`. Not when a ResourceQuota of its own namespace keeps it out and `behind` is another
/// namespace's: `behind` starting takes none of that quota, and the waiting job's team decides
/// when, if ever, it frees (the Pods it runs there; a quota below the job's need). Team A's most
/// urgent job, held back by team A's quota, kept team B's jobs off a shared tool and a node for as
/// long as team A liked (tests/tools.rs
/// `a_job_its_own_quota_keeps_waiting_holds_no_tool_or_node_room_against_other_teams`).
pub fn holds_capacity_against(ahead: &AgentJob, behind: &AgentJob) -> bool {
    let own_quota = ahead.status.as_ref().is_some_and(|s| s.insufficient_resources.iter().any(|r| r.starts_with("quota/")));
    !own_quota || ahead.metadata.namespace == behind.metadata.namespace
}

/// Calls per minute of `tool` that jobs queued ahead of `job` will claim when they start, most
/// urgent first: approved jobs waiting for capacity with a higher priority, or as high and older,
/// that hold it against `job` ([`holds_capacity_against`]).
pub fn rate_limit_claims_ahead(jobs: &[std::sync::Arc<AgentJob>], job: &AgentJob, tool: &str) -> Vec<i32> {
    let mine = queue_key(job);
    let mut ahead: Vec<_> = jobs
        .iter()
        .filter(|j| j.metadata.uid != job.metadata.uid && waits_for_capacity(j) && holds_capacity_against(j, job))
        .filter_map(|j| j.spec.tools.iter().find(|t| t.name == tool).map(|t| (queue_key(j), t.min_rate_limit)))
        .filter(|(key, _)| *key < mine)
        .collect();
    ahead.sort();
    ahead.into_iter().map(|(_, claim)| claim).collect()
}

/// The claims a running job's attempt holds, recorded when it started (None: the job is not
/// running, or an operator that did not record claims started it).
fn attempt_claims(job: &AgentJob) -> Option<&[crate::api::ToolClaim]> {
    let status = job.status.as_ref().filter(|s| s.phase == Some(JobPhase::Running))?;
    let running = status.attempts.iter().rev().find(|a| a.result == crate::api::AttemptResult::Running)?;
    running.tool_claims.as_deref()
}

/// The tools a job names, and those its running attempt holds a claim on even if a spec edit
/// has dropped them since (the job index files running jobs under these).
pub fn tools_named_or_claimed(job: &AgentJob) -> std::collections::BTreeSet<&str> {
    let claimed = attempt_claims(job).unwrap_or_default().iter().map(|c| c.name.as_str());
    job.spec.tools.iter().map(|t| t.name.as_str()).chain(claimed).collect()
}

/// Calls per minute running jobs claim from a tool, and how many jobs claim them. A running job
/// claims what its running attempt was started with, not what its spec says now: its author may
/// edit the spec while it runs, and would otherwise give back the rate limit it uses (for another
/// job of theirs to start past the limit) or claim the whole tool and keep every other team's
/// jobs waiting (tests/tools.rs `a_running_job_cannot_take_or_give_back_rate_limit_by_editing_its_spec`).
pub fn rate_limit_claims(jobs: &[std::sync::Arc<AgentJob>], tool: &str, except_uid: Option<&str>) -> (i32, usize) {
    jobs.iter()
        .filter(|j| j.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Running))
        .filter(|j| j.metadata.uid.as_deref() != except_uid)
        .filter_map(|j| match attempt_claims(j) {
            Some(claims) => claims.iter().find(|c| c.name == tool).map(|c| c.min_rate_limit),
            // Started by an operator that did not record claims: the spec is all there is.
            None => j.spec.tools.iter().find(|t| t.name == tool).map(|t| t.min_rate_limit),
        })
        .fold((0, 0), |(sum, n), claim| (sum.saturating_add(claim), n + 1))
}

pub fn vote_view(vote: &ApprovalVote) -> VoteView {
    VoteView {
        name: vote.name_any(),
        voter: vote.spec.voter.clone(),
        decision: vote.spec.decision,
        job_name: vote.spec.job_ref.name.clone(),
        job_uid: vote.spec.job_ref.uid.clone(),
        job_generation: vote.spec.job_ref.generation,
        reason: vote.spec.reason.clone(),
        created: vote.metadata.creation_timestamp.clone(),
        groups: vote.spec.voter_groups.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{Value, json};

    use super::*;

    /// A job naming tool `t` with `claim` calls/min, `priority`, created `minute` minutes past
    /// noon, in `phase` with the given InfrastructureReady reason (approved unless `approved` is
    /// false).
    fn job(name: &str, priority: i32, minute: u32, claim: i32, phase: &str, infra_reason: &str, approved: bool) -> Arc<AgentJob> {
        let cond = |type_: &str, status: bool, reason: &str| {
            json!({"type": type_, "status": if status { "True" } else { "False" }, "reason": reason, "message": "",
                   "lastTransitionTime": "2026-01-01T12:00:00Z"})
        };
        let value: Value = json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
            "metadata": {"name": name, "namespace": "team", "uid": format!("uid-{name}"),
                         "creationTimestamp": format!("2026-01-01T12:{minute:02}:00Z")},
            "spec": {"category": "c", "priority": priority,
                     "agents": {"primary": {"name": "a", "image": "i", "model": "gpt-4o-mini"}},
                     "tools": [{"name": "t", "minRateLimit": claim}], "budget": {"maxCostUSD": "1"}},
            "status": {"phase": phase, "conditions": [cond("Approved", approved, "Approved"), cond("InfrastructureReady", false, infra_reason)]},
        });
        Arc::new(serde_json::from_value(value).unwrap())
    }

    #[test]
    fn claims_ahead_are_those_of_more_urgent_or_older_capacity_waiters_in_queue_order() {
        let me = job("me", 5, 30, 5, "WaitingForResources", "RateLimitExhausted", true);
        let jobs = vec![
            me.clone(),
            job("urgent-late", 1, 59, 7, "WaitingForResources", "RateLimitExhausted", true),
            job("same-older", 5, 10, 3, "WaitingForResources", "InsufficientResources", true),
            job("same-newer", 5, 40, 100, "WaitingForResources", "RateLimitExhausted", true),
            job("less-urgent", 9, 0, 100, "WaitingForResources", "RateLimitExhausted", true),
            job("running", 1, 0, 100, "Running", "Ready", true),
            job("unapproved", 1, 0, 100, "AwaitingApproval", "RateLimitExhausted", false),
            job("broken-tool", 1, 0, 100, "WaitingForResources", "ToolsNotReady", true),
            job("never-fits", 1, 0, 100, "WaitingForResources", "RateLimitTooLow", true),
            job("quota", 2, 0, 4, "WaitingForResources", "QuotaExceeded", true),
        ];
        assert_eq!(rate_limit_claims_ahead(&jobs, &me, "t"), vec![7, 4, 3]);
        assert!(rate_limit_claims_ahead(&jobs, &me, "other-tool").is_empty());
        // The most urgent job has nobody ahead.
        assert!(rate_limit_claims_ahead(&jobs, &jobs[1], "t").is_empty());
    }

    /// A job its own namespace's quota keeps out holds its claim against its own namespace only.
    #[test]
    fn a_job_held_back_by_its_own_quota_holds_nothing_against_other_namespaces() {
        let quota_bound = |namespace: &str| {
            let mut j = (*job("quota", 1, 0, 8, "WaitingForResources", "QuotaExceeded", true)).clone();
            j.metadata.namespace = Some(namespace.into());
            j.status.as_mut().unwrap().insufficient_resources = vec!["quota/team".into()];
            Arc::new(j)
        };
        let me = job("me", 5, 30, 5, "WaitingForResources", "RateLimitExhausted", true);
        let mut elsewhere = (*me).clone();
        elsewhere.metadata.namespace = Some("other-team".into());
        let jobs = vec![me.clone(), quota_bound("team")];
        assert_eq!(rate_limit_claims_ahead(&jobs, &me, "t"), vec![8], "same namespace: held");
        assert!(rate_limit_claims_ahead(&jobs, &elsewhere, "t").is_empty(), "another namespace: not held");
        assert!(holds_capacity_against(&jobs[1], &me) && !holds_capacity_against(&jobs[1], &elsewhere));
        // Waiting for a node (shared capacity), it holds against everyone.
        let node_bound = job("node", 1, 0, 8, "WaitingForResources", "InsufficientResources", true);
        assert!(holds_capacity_against(&node_bound, &elsewhere));
        assert_eq!(rate_limit_claims_ahead(&[me.clone(), node_bound], &elsewhere, "t"), vec![8]);
    }

    #[test]
    fn a_job_missing_a_required_tool_holds_nothing_even_when_its_first_reason_is_capacity() {
        let me = job("me", 5, 30, 5, "WaitingForResources", "RateLimitExhausted", true);
        let mut ahead = (*job("ahead", 1, 0, 8, "WaitingForResources", "RateLimitExhausted", true)).clone();
        assert!(waits_for_capacity(&ahead));
        ahead.spec.tools.push(serde_json::from_value(json!({"name": "gone", "required": true})).unwrap());
        ahead.status.as_mut().unwrap().missing_tools = vec!["gone".into()];
        assert!(!waits_for_capacity(&ahead));
        assert!(rate_limit_claims_ahead(&[me.clone(), Arc::new(ahead.clone())], &me, "t").is_empty());
        // An optional missing tool does not stop it from waiting for capacity.
        ahead.spec.tools.last_mut().unwrap().required = false;
        assert!(waits_for_capacity(&ahead));
        assert_eq!(rate_limit_claims_ahead(&[me.clone(), Arc::new(ahead)], &me, "t"), vec![8]);
    }

    #[test]
    fn running_claims_exclude_the_job_itself() {
        let a = job("a", 5, 0, 8, "Running", "Ready", true);
        let b = job("b", 5, 1, 5, "Running", "Ready", true);
        let jobs = vec![a.clone(), b, job("c", 5, 2, 3, "WaitingForResources", "RateLimitExhausted", true)];
        assert_eq!(rate_limit_claims(&jobs, "t", None), (13, 2));
        assert_eq!(rate_limit_claims(&jobs, "t", a.metadata.uid.as_deref()), (5, 1));
    }

    /// A running job's author edits its spec: the attempt keeps claiming what it started with.
    #[test]
    fn a_running_attempt_claims_what_it_started_with_whatever_the_spec_says_now() {
        let started = |spec_claim: i32, attempt_claims: Option<Vec<(&str, i32)>>| {
            let mut j = (*job("a", 5, 0, spec_claim, "Running", "Ready", true)).clone();
            let claims = attempt_claims
                .map(|c| c.into_iter().map(|(name, min_rate_limit)| crate::api::ToolClaim { name: name.into(), min_rate_limit }).collect());
            let attempt =
                crate::api::Attempt { attempt: 1, result: crate::api::AttemptResult::Running, tool_claims: claims, ..Default::default() };
            j.status.as_mut().unwrap().attempts = vec![attempt];
            vec![Arc::new(j)]
        };
        type Claims = Option<Vec<(&'static str, i32)>>;
        let cases: &[(&str, i32, Claims, (i32, usize))] = &[
            ("raised in the spec after start: still 8", 1_000_000, Some(vec![("t", 8)]), (8, 1)),
            ("lowered to 0 in the spec after start: still 8", 0, Some(vec![("t", 8)]), (8, 1)),
            ("added to the spec after start: nothing", 60, Some(vec![("other", 8)]), (0, 0)),
            ("started without the tool: nothing", 60, Some(vec![]), (0, 0)),
            ("an attempt of an older operator: the spec's", 7, None, (7, 1)),
        ];
        for (case, spec_claim, claims, want) in cases {
            assert_eq!(rate_limit_claims(&started(*spec_claim, claims.clone()), "t", None), *want, "{case}");
        }
    }

    /// A failed agent's reason: the Pod's (DeadlineExceeded), else the kubelet's reason for the
    /// container when it names a cause (OOMKilled), else the exit code.
    #[test]
    fn failed_pod_reasons() {
        let pod = |pod_reason: Option<&str>, container_reason: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "labels": {LABEL_ATTEMPT: "1", LABEL_AGENT: "a"}},
                "status": {"phase": "Failed", "reason": pod_reason, "containerStatuses": [{"name": "agent", "image": "i", "imageID": "",
                    "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 137, "reason": container_reason}}}]}}))
            .unwrap()
        };
        let reason = |p: Pod| match pod_view(&p).unwrap().state {
            PodState::Failed { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(pod(Some("DeadlineExceeded"), "Error")), "DeadlineExceeded");
        assert_eq!(reason(pod(None, "OOMKilled")), "OOMKilled (exit code 137)");
        assert_eq!(reason(pod(None, "Error")), "exit code 137");
    }

    fn labelled_pod(namespace: &str, label_uid: &str, controller: Option<(&str, &str, bool)>) -> Pod {
        let owners: Vec<Value> = controller
            .map(|(kind, uid, is_controller)| {
                json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": kind, "name": "scan", "uid": uid, "controller": is_controller})
            })
            .into_iter()
            .collect();
        serde_json::from_value(json!({"metadata": {"name": "scan-a-1", "namespace": namespace,
            "labels": {"agentgate.dev/job-uid": label_uid, "agentgate.dev/agent": "a", "agentgate.dev/attempt": "1"},
            "ownerReferences": owners}}))
        .unwrap()
    }

    #[test]
    fn a_jobs_pods_are_those_it_controls_in_its_namespace_never_those_only_labelled() {
        let cases = [
            ("the operator's own Pod", labelled_pod("team", "uid-1", Some(("AgentJob", "uid-1", true))), true, false),
            ("labelled, no owner", labelled_pod("team", "uid-1", None), false, true),
            ("labelled, in another namespace", labelled_pod("other", "uid-1", Some(("AgentJob", "uid-1", true))), false, true),
            ("labelled, owned but not controlled", labelled_pod("team", "uid-1", Some(("AgentJob", "uid-1", false))), false, true),
            ("labelled, controlled by something else", labelled_pod("team", "uid-1", Some(("ReplicaSet", "uid-1", true))), false, true),
            ("another job's Pod", labelled_pod("team", "uid-2", Some(("AgentJob", "uid-2", true))), false, false),
        ];
        for (name, pod, ours, decoy) in cases {
            assert_eq!(is_job_pod(&pod, "team", "uid-1"), ours, "{name}");
            assert_eq!(claims_job_falsely(&pod, "team", "uid-1"), decoy, "{name}");
        }
    }
}

#[cfg(test)]
mod requests_tests {
    use serde_json::json;

    use super::*;
    use crate::domain::meter_sidecar::{MeterBudget, MeterSidecar};
    use crate::domain::pod_builder::{PodPlan, build_pod};

    const MIB: i128 = 1024 * 1024;

    fn job(resources: serde_json::Value) -> AgentJob {
        serde_json::from_value(json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
            "metadata": {"name": "j", "namespace": "team", "uid": "uid-j"},
            "spec": {"category": "c", "agents": {"primary": {"name": "a", "image": "i", "model": "gpt-4o-mini"},
                                                   "supporting": [{"name": "b", "image": "i", "model": "gpt-4o-mini"}]},
                     "resources": resources, "budget": {"maxCostUSD": "1"}},
        }))
        .unwrap()
    }

    /// The Pod the operator builds for `job`'s primary agent, as `controller/agent_job.rs` does.
    fn built(job: &AgentJob) -> Pod {
        let meter = MeterSidecar {
            image: "agentgate:1".into(),
            keys_secret: "keys".into(),
            openai_key: true,
            anthropic_key: false,
            openai_upstream: None,
            anthropic_upstream: None,
            budget: MeterBudget::Grants("https://operator:8444".into()),
            grant_ca_pem: None,
        };
        let res = job.spec.resources.as_ref();
        build_pod(&PodPlan {
            job_name: "j",
            namespace: "team",
            job_uid: "uid-j",
            job_generation: 1,
            agent: &job.spec.agents.primary,
            attempt: 1,
            cpu: res.map_or(DEFAULT_CPU, |r| r.cpu.as_str()),
            memory: res.map_or(DEFAULT_MEMORY, |r| r.memory.as_str()),
            gpu: res.and_then(|r| r.gpu).map(|g| ("nvidia.com/gpu", g)),
            deadline_seconds: 60,
            budget_usd: "1",
            input_json: "{}",
            tool_urls: &[],
            meter: &meter,
        })
    }

    #[test]
    fn the_need_checked_before_the_run_is_what_the_built_pod_requests_sidecar_included() {
        let gpu_job = job(json!({"cpu": "950m", "memory": "1Gi", "gpu": 2}));
        let need = pod_need(&gpu_job).unwrap();
        assert_eq!(need.per_pod, pod_requests(&built(&gpu_job)), "the scheduler's count of the Pod the operator builds");
        let gpus = BTreeMap::from([("nvidia.com/gpu".to_string(), 2)]);
        assert_eq!(need.per_pod, Resources { cpu_milli: 1050, memory_bytes: 1088 * MIB, extended: gpus });
        assert_eq!((need.sidecar.cpu_milli, need.sidecar.memory_bytes, need.pods), (100, 64 * MIB, 2));
        // Without `resources` the Pod gets the builder's defaults, and the check counts them.
        let plain = job(serde_json::Value::Null);
        assert!(plain.spec.resources.is_none());
        assert_eq!(pod_need(&plain).unwrap().per_pod, pod_requests(&built(&plain)));
        assert_eq!(pod_need(&plain).unwrap().per_pod.cpu_milli, 600);
    }

    #[test]
    fn a_pod_is_lost_only_in_its_jobs_namespace_named_and_labelled_so_with_the_finalizer_and_no_job_controller() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let owned = built(&job(serde_json::Value::Null));
        assert_eq!(labelled_job(&owned), Some(("j", "uid-j")));
        assert!(!lost_job_pod(&owned, "team", "j", "uid-j"), "controlled by the job: its own, not lost");
        let mut stripped = owned.clone();
        stripped.metadata.owner_references = None;
        assert!(lost_job_pod(&stripped, "team", "j", "uid-j"));
        assert!(!lost_job_pod(&stripped, "team", "j", "uid-other"), "another job's");
        assert!(!lost_job_pod(&stripped, "elsewhere", "j", "uid-j"), "another namespace");
        // An owner of another kind made controller does not make it any less the job's.
        let mut replaced = stripped.clone();
        let config_map = OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: "c".into(),
            uid: "u".into(),
            controller: Some(true),
            ..OwnerReference::default()
        };
        replaced.metadata.owner_references = Some(vec![config_map]);
        assert!(lost_job_pod(&replaced, "team", "j", "uid-j"));
        let mut released = stripped.clone();
        released.metadata.finalizers = None;
        assert!(!lost_job_pod(&released, "team", "j", "uid-j"), "without the finalizer: proves nothing");
        let mut renamed = stripped.clone();
        renamed.metadata.name = Some("mine".into());
        assert!(!lost_job_pod(&renamed, "team", "j", "uid-j"), "not named as the labels say");
        let mut another = owned.clone();
        another.metadata.owner_references.as_mut().unwrap()[0].uid = "uid-other".into();
        assert!(!lost_job_pod(&another, "team", "j", "uid-j"), "controlled by another job");
    }

    #[test]
    fn a_pods_requests_count_init_containers_sidecars_limits_and_overhead() {
        let pod: Pod = serde_json::from_value(json!({"spec": {
            "overhead": {"cpu": "10m"},
            "initContainers": [
                {"name": "setup", "image": "i", "resources": {"requests": {"cpu": "2", "memory": "10Mi"}}},
                {"name": "proxy", "image": "i", "restartPolicy": "Always", "resources": {"limits": {"cpu": "200m", "memory": "100Mi"}}},
            ],
            "containers": [{"name": "app", "image": "i", "resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "3", "memory": "1Gi"}}}],
        }}))
        .unwrap();
        // max(app 1000m + proxy 200m, setup 2000m) + 10m overhead; memory: the app's limit (no
        // request) 1024Mi + the proxy's 100Mi.
        let r = pod_requests(&pod);
        assert_eq!((r.cpu_milli, r.memory_bytes), (2010, 1124 * MIB));
    }

    /// Two Pods bound to one node, each of whose containers asks for 10^17 exa-cores: the node's
    /// sum overflowed i128 (a panic in a debug build, a wrapped, wrong figure in release) before
    /// quantities were capped at what Kubernetes represents (quantity.rs).
    #[test]
    fn two_huge_requests_on_one_node_do_not_overflow() {
        use std::sync::Arc;
        let huge = |name: &str| -> Arc<Pod> {
            let container = |c: &str| json!({"name": c, "image": "i", "resources": {"requests": {"cpu": "100000000000000000E", "memory": "100000000000000000E", "nvidia.com/gpu": "100000000000000000E"}}});
            Arc::new(
                serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"nodeName": "n1", "containers": [container("a"), container("b")]}, "status": {"phase": "Running"}}))
                    .unwrap(),
            )
        };
        let node: Arc<Node> = Arc::new(
            serde_json::from_value(json!({"metadata": {"name": "n1"}, "status": {"allocatable": {"cpu": "4", "memory": "8Gi"}, "conditions": [{"type": "Ready", "status": "True"}]}}))
                .unwrap(),
        );
        let views = node_views(&[node], &[huge("p1"), huge("p2")]);
        let free = &views[0].free;
        assert_eq!(free.cpu_milli, 4000 - 4 * crate::domain::quantity::MAX_MILLI);
        assert!(free.memory_bytes < 0 && free.extended["nvidia.com/gpu"] < 0, "{free:?}");
    }
}
