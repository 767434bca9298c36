//! What the watch caches keep of each object: only what the operator reads from them, so that
//! 10,000 cached jobs, every Pod of the cluster and tenants' oversized metadata fit in the
//! operator's memory (README "Performance"). Applied with `.modify()` before an object reaches
//! its store, its index or a trigger.

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{reflector, watcher};
use kube::{Resource, ResourceExt};

use super::{agent_job, pod_finalizer, snapshot};
use crate::api::{AgentJob, ApprovalVote};

/// Drops what a cache never reads, so 10,000 cached objects stay small.
pub fn metadata<K: Resource>(obj: &mut K) {
    // `None`, not an emptied Vec: `clear()` keeps the entries' allocation (~0.4 KB per object).
    obj.meta_mut().managed_fields = None;
    obj.annotations_mut().remove("kubectl.kubernetes.io/last-applied-configuration");
}

/// Keeps of a job what the operator reads from the cache, since a tenant may make the rest of
/// it a MiB and 10,000 cached jobs must fit in 64 MiB (tests/isolation.rs):
/// - of its metadata, its identity and version and timestamps; no labels, annotations,
///   finalizers or ownerReferences (nothing reads them: the Pods' labels and the spec history's
///   owner come from the job's identity, status writes send only name, uid and resourceVersion,
///   and the `requested-by` annotation is kept by `index::RequesterIndex`, fed before this);
/// - of its spec, `input`, `inputSchema`, `outputSchema`, `description` and the agents'
///   `command`, `args` and `env` only while together they take at most `ELIDE_SPEC_OVER`
///   bytes of JSON. Bigger, they are all left out and the cached copy carries
///   `agent_job::SPEC_ELIDED`: a reconcile that may read them reads the job from the API first
///   (`agent_job::whole`); everything else that reads cached jobs (indexes, wakeups,
///   recommendations, metrics) reads only the kept fields.
pub fn job(job: &mut AgentJob) {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let meta = std::mem::take(&mut job.metadata);
    job.metadata = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        generation: meta.generation,
        creation_timestamp: meta.creation_timestamp,
        deletion_timestamp: meta.deletion_timestamp,
        ..ObjectMeta::default()
    };
    let spec = &mut job.spec;
    let agents = std::iter::once(&spec.agents.primary).chain(&spec.agents.supporting);
    let size = [json_len(&spec.input), json_len(&spec.input_schema), json_len(&spec.output_schema), json_len(&spec.description)]
        .into_iter()
        .chain(agents.flat_map(|a| [json_len(&a.command), json_len(&a.args), json_len(&a.env)]))
        .fold(0, usize::saturating_add);
    if size > agent_job::ELIDE_SPEC_OVER {
        (spec.input, spec.input_schema, spec.output_schema, spec.description) = (None, None, None, None);
        for agent in std::iter::once(&mut spec.agents.primary).chain(&mut spec.agents.supporting) {
            (agent.command, agent.args, agent.env) = (Vec::new(), Vec::new(), Vec::new());
        }
        job.metadata.annotations.get_or_insert_default().insert(agent_job::SPEC_ELIDED.to_string(), String::new());
    }
}

/// Bytes of a field's JSON; usize::MAX if it cannot be encoded (left out, then).
fn json_len<T: serde::Serialize>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |b| b.len())
}

/// Whether the operator reads this Pod from the cache: one an AgentJob controls, one posing as a
/// job's (its job-uid label, reported as a decoy) or one holding the usage finalizer. Every
/// other Pod of the cluster only feeds the node-capacity index (index.rs), never the store: a
/// slimmed Pod still costs ~2 KB cached (k8s-openapi's `PodSpec` is inline), 40 MB for 20,000
/// foreign Pods (README "In a busy cluster").
fn is_agentgate_pod(pod: &Pod) -> bool {
    snapshot::pod_controller_job_uid(pod).is_some() || snapshot::labelled_job_uid(pod).is_some() || pod_finalizer::holds_finalizer(pod)
}

/// Applies a Pod watch event to the store, foreign Pods left out (`is_agentgate_pod`), and
/// passes it on unless it is only about a foreign Pod. A Pod that stops being agentgate's
/// (its labels or owners changed) leaves the store as if deleted. What is stored and passed on
/// is `stored_pod`'s part: the index has taken the requests in already.
pub fn store_agentgate_pods(store: &mut reflector::store::Writer<Pod>, mut event: watcher::Event<Pod>) -> Option<watcher::Event<Pod>> {
    use watcher::Event;
    if let Event::Apply(pod) | Event::InitApply(pod) = &mut event {
        stored_pod(pod);
    }
    match &event {
        Event::Apply(pod) | Event::Delete(pod) if !is_agentgate_pod(pod) => {
            let mut gone = Pod::default();
            (gone.metadata.name, gone.metadata.namespace) = (pod.metadata.name.clone(), pod.metadata.namespace.clone());
            store.apply_watcher_event(&Event::Delete(gone));
            None
        }
        Event::InitApply(pod) if !is_agentgate_pod(pod) => None,
        _ => {
            store.apply_watcher_event(&event);
            Some(event)
        }
    }
}

/// For an operator watching one namespace (`--namespace`): forgets what makes a Pod in another
/// namespace agentgate's (its AgentJob owner, job labels, finalizers), unless it is labelled
/// with the uid of one of this operator's jobs (a decoy, to report). The Pod still counts for
/// node capacity (index.rs), but another namespace's agent Pods belong to another operator:
/// caching them cost an operator of one namespace 4.7 KB per Pod of every other in the store
/// and 1.9 KB in the index, and its orphan sweep a GET per such Pod on every Pod event
/// (`make bench`'s scale row, run after the other rows: 8,500 Pods, 54 MiB, 1.6 GETs per job).
pub fn pod_scope(pod: &mut Pod, namespace: Option<&str>, is_own_job_uid: impl Fn(&str) -> bool) {
    let Some(ns) = namespace else { return };
    if pod.metadata.namespace.as_deref() == Some(ns) || snapshot::labelled_job_uid(pod).is_some_and(is_own_job_uid) {
        return;
    }
    (pod.metadata.owner_references, pod.metadata.labels, pod.metadata.finalizers) = (None, None, None);
}

/// Of a slimmed Pod (`pod`), what the store keeps: no requests (only the Pod index reads them,
/// from the watch event, before the store) and only the `agent` container's status
/// (`snapshot::pod_view`). A container's inline size is 2.3 KB in k8s-openapi, its status 0.75 KB:
/// an agent Pod with its meter sidecar cached 12.7 KB, this keeps about a third of that
/// (`GET /debug/memory`).
fn stored_pod(pod: &mut Pod) {
    if let Some(spec) = pod.spec.as_mut() {
        (spec.containers, spec.init_containers, spec.overhead) = (Vec::new(), None, None);
    }
    if let Some(statuses) = pod.status.as_mut().and_then(|s| s.container_statuses.as_mut()) {
        statuses.retain(|c| c.name == "agent");
    }
}

/// Keeps of a Pod only what the operator reads from the cache (every Pod of the cluster is
/// watched, for node capacity): its identity, labels and owners, the node, the containers' and
/// init containers' requests and the overhead (`snapshot::node_views`), the phase and the `agent` container's termination
/// (`snapshot::pod_view`), and its IPs (`meter_auth`). Anything else a reconcile needs of a Pod must be read elsewhere.
pub fn pod(pod: &mut Pod) {
    use k8s_openapi::api::core::v1::{Container, ContainerStatus, PodSpec, PodStatus};
    metadata(pod);
    // The generation a Pod was built from is the only annotation read (adopting an unrecorded attempt).
    let generation = crate::domain::pod_builder::ANNOTATION_JOB_GENERATION;
    pod.metadata.annotations = pod
        .metadata
        .annotations
        .take()
        .map(|a| a.into_iter().filter(|(k, _)| k == generation).collect())
        .filter(|a: &std::collections::BTreeMap<_, _>| !a.is_empty());
    if let Some(spec) = pod.spec.take() {
        let containers =
            spec.containers.into_iter().map(|c| Container { name: c.name, resources: c.resources, ..Container::default() }).collect();
        // Init containers and sidecars (restartPolicy) and the overhead count in the Pod's
        // requests as the scheduler counts them (controller::tests::a_slimmed_pod_reads_the_same_and_is_smaller).
        let init_containers = spec.init_containers.map(|cs| {
            cs.into_iter()
                .map(|c| Container { name: c.name, resources: c.resources, restart_policy: c.restart_policy, ..Container::default() })
                .collect()
        });
        pod.spec = Some(PodSpec { node_name: spec.node_name, containers, init_containers, overhead: spec.overhead, ..PodSpec::default() });
    }
    if let Some(status) = pod.status.take() {
        let container_statuses = status
            .container_statuses
            .map(|cs| cs.into_iter().map(|c| ContainerStatus { name: c.name, state: c.state, ..ContainerStatus::default() }).collect());
        // Of the meter sidecar, only whether it started and its stopped processes' termination
        // messages (its usage, at most 4 KiB each, the kubelet's cap; `snapshot::pod_meter`).
        let init_container_statuses = status.init_container_statuses.map(|cs| {
            cs.into_iter()
                .filter(|c| c.name == crate::domain::meter_sidecar::CONTAINER)
                .map(|c| ContainerStatus {
                    name: c.name,
                    state: meter_state(c.state),
                    last_state: meter_state(c.last_state),
                    // With the exit code below: whether its one process stopped cleanly, every
                    // call ended (`snapshot::pod_meter`).
                    restart_count: c.restart_count,
                    ..ContainerStatus::default()
                })
                .filter(|c| c.state.is_some() || c.last_state.is_some())
                .collect()
        });
        // The Pod's addresses: the meter API tells a request from the Pod its token claims from one
        // sent from anywhere else (meter_auth.rs).
        let pod_ips = status.pod_ips;
        pod.status = Some(PodStatus {
            phase: status.phase,
            reason: status.reason,
            container_statuses,
            init_container_statuses,
            pod_ips,
            ..PodStatus::default()
        });
    }
}

/// Of a meter container's state, only a termination: whether the process had started, its exit
/// code, and its message, cut at the kubelet's 4 KiB (`snapshot::pod_meter`). A running meter's state is not
/// kept: the operator reads the meter once its Pod has ended, when the kubelet has stopped it.
fn meter_state(state: Option<k8s_openapi::api::core::v1::ContainerState>) -> Option<k8s_openapi::api::core::v1::ContainerState> {
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated};
    let terminated = state?.terminated?;
    Some(ContainerState {
        terminated: Some(ContainerStateTerminated {
            started_at: terminated.started_at,
            exit_code: terminated.exit_code,
            message: terminated.message.filter(|m| m.len() <= crate::domain::meter_message::MAX_BYTES),
            ..ContainerStateTerminated::default()
        }),
        ..ContainerState::default()
    })
}

/// Keeps of a Node what `snapshot::node_view` reads: its name, `unschedulable` and taints, its
/// allocatable resources and the type and status of its conditions. A real node's status lists
/// its cached images (up to 50, several names each), its node info, addresses and volumes, and
/// its annotations are often kilobytes: cached whole, a 1,000-node cluster cost megabytes for
/// nothing (the bench's fake nodes cannot show it).
pub fn node(node: &mut Node) {
    use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let meta = std::mem::take(&mut node.metadata);
    node.metadata = ObjectMeta { name: meta.name, uid: meta.uid, resource_version: meta.resource_version, ..ObjectMeta::default() };
    node.spec = node.spec.take().map(|spec| NodeSpec { unschedulable: spec.unschedulable, taints: spec.taints, ..NodeSpec::default() });
    node.status = node.status.take().map(|status| NodeStatus {
        allocatable: status.allocatable,
        conditions: status
            .conditions
            .map(|cs| cs.into_iter().map(|c| NodeCondition { type_: c.type_, status: c.status, ..NodeCondition::default() }).collect()),
        ..NodeStatus::default()
    });
}

/// Keeps of a Service what the operator reads: its identity, the one label and four annotations
/// discovery reads, and the name and number of its first [`MAX_SERVICE_PORTS`] ports (a tool's
/// endpoint check). Every Service of the cluster is watched (a tool may name any), and any tenant
/// may create Services: 400 with 250 KiB under `agentgate.dev/` annotation keys, or with
/// thousands of ports, were cached whole (tests/isolation.rs
/// `services_padded_with_agentgate_keys_or_thousands_of_ports_are_not_cached_whole`).
/// - A discovery annotation value longer than [`MAX_ANNOTATION_BYTES`] once trimmed is no valid
///   rate limit, port or type: its first 64 characters and an ellipsis are kept, for the
///   message. The description keeps the 1,024 characters discovery takes of it.
/// - An EndpointSlice holds at most 100 ports, and the EndpointSlice controller fails to publish
///   a Service with more (kubernetes/kubernetes#99382), so such a Service has no ready endpoints
///   for a tool anyway; a tool naming a port past the 100th is told it has no such port.
pub fn service(svc: &mut Service) {
    use super::discovery::{DESCRIPTION, PORT, RATE_LIMIT, TOOL_LABEL, TOOL_TYPE};
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    metadata(svc);
    svc.metadata.labels = svc.metadata.labels.take().and_then(|mut labels| {
        let tool = labels.remove_entry(TOOL_LABEL)?;
        Some(std::iter::once(tool).collect())
    });
    svc.metadata.annotations = svc
        .metadata
        .annotations
        .take()
        .map(|mut annotations| {
            [TOOL_TYPE, RATE_LIMIT, PORT, DESCRIPTION]
                .into_iter()
                .filter_map(|key| {
                    let (key, value) = annotations.remove_entry(key)?;
                    let trimmed = value.trim();
                    let kept = if key == DESCRIPTION {
                        trimmed.chars().take(1024).collect()
                    } else if trimmed.len() <= MAX_ANNOTATION_BYTES {
                        trimmed.to_string()
                    } else {
                        format!("{}…", trimmed.chars().take(64).collect::<String>())
                    };
                    Some((key, kept))
                })
                .collect::<std::collections::BTreeMap<_, _>>()
        })
        .filter(|m| !m.is_empty());
    let kept = |ports: Vec<ServicePort>| -> Vec<ServicePort> {
        ports.into_iter().take(MAX_SERVICE_PORTS).map(|p| ServicePort { name: p.name, port: p.port, ..ServicePort::default() }).collect()
    };
    svc.spec = svc.spec.take().map(|spec| ServiceSpec { ports: spec.ports.map(kept), ..ServiceSpec::default() });
    svc.status = None;
}

/// Keeps of an EndpointSlice what a tool's endpoint check reads: its identity, the
/// `kubernetes.io/service-name` label and each endpoint's `ready` condition. The EndpointSlice
/// controller copies a Service's labels onto each of its slices, and every slice of the cluster
/// is watched: a tenant's Service carrying 100 KiB of labels was cached again in each slice
/// (tests/isolation.rs `endpoint_slices_carrying_a_services_padded_labels_are_not_cached_whole`).
pub fn endpoint_slice(slice: &mut EndpointSlice) {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    metadata(slice);
    slice.metadata.labels = slice.metadata.labels.take().and_then(|mut labels| {
        let service = labels.remove_entry(SERVICE_NAME_LABEL)?;
        Some(std::iter::once(service).collect())
    });
    slice.metadata.annotations = None;
    slice.ports = None;
    let ready_only = |e: Endpoint| Endpoint {
        conditions: e.conditions.map(|c| EndpointConditions { ready: c.ready, ..EndpointConditions::default() }),
        ..Endpoint::default()
    };
    slice.endpoints = slice.endpoints.take().map(|endpoints| endpoints.into_iter().map(ready_only).collect());
}

/// The label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Ports kept of a Service: what one EndpointSlice may list.
pub const MAX_SERVICE_PORTS: usize = 100;
/// Longest discovery annotation value kept whole (trimmed), other than the description.
pub const MAX_ANNOTATION_BYTES: usize = 256;

/// A vote's labels and annotations are never read (`snapshot::vote_view`), and a tenant may
/// make them 256 KiB per vote.
pub fn vote(vote: &mut ApprovalVote) {
    metadata(vote);
    vote.metadata.labels = None;
    vote.metadata.annotations = None;
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::{Node, Pod};
    use kube::ResourceExt;
    use serde_json::json;

    use super::{pod as slim_pod, snapshot};
    use crate::domain::pod_builder::{PodPlan, build_pod};

    /// A meter's termination message for `session` with `tokens` input tokens (and as many micro-USD).
    fn meter_message(session: &str, tokens: i64) -> String {
        let mut usage = crate::api::Usage::default();
        let counts = crate::domain::pricing::TokenCounts { input: tokens, ..Default::default() };
        crate::domain::report::add_model_usage(&mut usage, "gpt-4o-mini", &counts, crate::domain::money::MicroUsd(tokens));
        usage.cost_usd = crate::domain::money::MicroUsd(tokens).to_string();
        crate::domain::meter_message::encode(&crate::domain::grants::session_key(session), &usage, 0)
    }

    /// An agent Pod as the apiserver returns it once bound and finished, `phase` "Succeeded" or
    /// "Failed", with the operator's own env, volumes and annotations and the kubelet's status.
    fn finished_pod(phase: &str) -> Pod {
        let agent = serde_json::from_value(json!({"name": "scanner", "image": "ghcr.io/acme/scanner:1", "model": "gpt-4o-mini",
            "env": [{"name": "MODE", "value": "deep"}], "args": ["--all"]}))
        .unwrap();
        let config = crate::domain::meter_sidecar::MeterConfig {
            image: "ghcr.io/agentgate/agentgate:1".into(),
            keys_secret: "agentgate-llm-keys".into(),
            openai_upstream: None,
            anthropic_upstream: None,
            budget_mode: crate::domain::meter_sidecar::BudgetMode::Fixed,
            grant_url: String::new(),
        };
        let (meter, _) = config.plan("team", None, "1.00");
        let mut pod = build_pod(&PodPlan {
            job_name: "scan",
            namespace: "team",
            job_uid: "uid-1",
            job_generation: 4,
            agent: &agent,
            attempt: 2,
            cpu: "500m",
            memory: "1Gi",
            gpu: Some(("nvidia.com/gpu", 1)),
            deadline_seconds: 600,
            budget_usd: "1.00",
            input_json: r#"{"repo": "x"}"#,
            tool_urls: &[("bandit".into(), "http://bandit.tools.svc:8080".into())],
            meter: &meter,
        });
        pod.metadata.uid = Some("pod-uid".into());
        pod.metadata.annotations.get_or_insert_default().insert("note".to_string(), "x".repeat(500));
        pod.spec.as_mut().unwrap().node_name = Some("node-a".into());
        pod.status = Some(
            serde_json::from_value(json!({"phase": phase, "reason": if phase == "Failed" { "DeadlineExceeded" } else { "" },
                "conditions": [{"type": "Ready", "status": "False"}], "podIP": "10.0.0.7", "qosClass": "Guaranteed",
                "containerStatuses": [{"name": "agent", "image": "ghcr.io/acme/scanner:1", "imageID": "sha256:abc", "ready": false,
                    "restartCount": 0, "containerID": "containerd://1",
                    "state": {"terminated": {"exitCode": 3, "message": "{\"usage\": {}}", "reason": "Error"}}}],
                // The meter: restarted once; its two processes' messages are its usage.
                "initContainerStatuses": [{"name": "agentgate-meter", "image": "ghcr.io/agentgate/agentgate:1", "imageID": "sha256:def",
                    "ready": false, "restartCount": 1, "containerID": "containerd://2", "started": phase == "Running",
                    "state": if phase == "Running" { json!({"running": {"startedAt": "2026-11-30T10:00:05Z"}}) } else {
                        json!({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": "2026-11-30T10:00:05Z", "message": meter_message("s2", 20)}})
                    },
                    "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "startedAt": "2026-11-30T10:00:00Z",
                        "message": meter_message("s1", 10)}}}]}))
            .unwrap(),
        );
        pod
    }

    fn pod_of(name: &str, owner: Option<&str>) -> Pod {
        let owners: Vec<serde_json::Value> = owner
            .map(|kind| {
                json!({"apiVersion": if kind == "AgentJob" { "agentgate.dev/v1alpha1" } else { "apps/v1" },
                "kind": kind, "name": "x", "uid": "uid-1", "controller": true})
            })
            .into_iter()
            .collect();
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "team", "ownerReferences": owners}})).unwrap()
    }

    #[test]
    fn only_agentgate_pods_are_stored_and_passed_on() {
        use kube::runtime::watcher::Event;
        let (store, mut writer) = kube::runtime::reflector::store::<Pod>();
        let names = |store: &kube::runtime::reflector::Store<Pod>| {
            let mut n: Vec<String> = store.state().iter().map(|p| p.metadata.name.clone().unwrap()).collect();
            n.sort();
            n
        };
        let relist = [
            Event::Init,
            Event::InitApply(pod_of("agent", Some("AgentJob"))),
            Event::InitApply(pod_of("web", Some("ReplicaSet"))),
            Event::InitDone,
        ];
        let passed: Vec<_> = relist.into_iter().filter_map(|e| super::store_agentgate_pods(&mut writer, e)).collect();
        assert_eq!(passed.len(), 3, "Init, the agent Pod and InitDone: {passed:?}");
        assert_eq!(names(&store), ["agent"]);
        // A foreign Pod's change is not passed on; an agent Pod that loses its owner leaves the store.
        assert!(super::store_agentgate_pods(&mut writer, Event::Apply(pod_of("web", Some("ReplicaSet")))).is_none());
        assert!(super::store_agentgate_pods(&mut writer, Event::Apply(pod_of("agent", None))).is_none());
        assert!(names(&store).is_empty());
        assert!(super::store_agentgate_pods(&mut writer, Event::Apply(pod_of("agent", Some("AgentJob")))).is_some());
        let mut decoy = pod_of("decoy", None);
        decoy.metadata.labels = Some([(crate::domain::pod_builder::LABEL_JOB_UID.to_string(), "uid-1".to_string())].into());
        assert!(super::store_agentgate_pods(&mut writer, Event::Apply(decoy)).is_some(), "a decoy is read, to be reported");
        assert_eq!(names(&store), ["agent", "decoy"]);
        assert!(super::store_agentgate_pods(&mut writer, Event::Delete(pod_of("agent", Some("AgentJob")))).is_some());
        assert_eq!(names(&store), ["decoy"]);
    }

    #[test]
    fn an_operator_of_one_namespace_reads_no_other_namespaces_agent_pods() {
        use kube::runtime::watcher::Event;
        let (store, mut writer) = kube::runtime::reflector::store::<Pod>();
        let elsewhere = |name: &str, uid: &str| {
            let mut pod = pod_of(name, Some("AgentJob"));
            pod.metadata.namespace = Some("other-team".into());
            pod.metadata.labels = Some([(crate::domain::pod_builder::LABEL_JOB_UID.to_string(), uid.to_string())].into());
            pod.metadata.finalizers = Some(vec![crate::domain::pod_builder::USAGE_FINALIZER.to_string()]);
            pod
        };
        let scoped = |mut pod: Pod| {
            super::pod_scope(&mut pod, Some("team"), |uid| uid == "own-job");
            pod
        };
        // Another team's agent Pod (its own job's uid label) is foreign here: not stored, not
        // passed on, not indexed by job, whether listed or changed.
        let theirs = scoped(elsewhere("theirs", "their-job"));
        let mut index = crate::controller::index::PodIndex::default();
        index.apply(&Event::Apply(theirs.clone()));
        assert_eq!(index.objects(), 0, "an unbound Pod of another namespace is not indexed");
        assert!(super::store_agentgate_pods(&mut writer, Event::InitApply(theirs.clone())).is_none());
        assert!(super::store_agentgate_pods(&mut writer, Event::Apply(theirs)).is_none());
        // A decoy elsewhere carrying one of this operator's jobs' uid is still read, to be reported.
        assert!(super::store_agentgate_pods(&mut writer, Event::Apply(scoped(elsewhere("decoy", "own-job")))).is_some());
        assert!(super::store_agentgate_pods(&mut writer, Event::Apply(scoped(pod_of("mine", Some("AgentJob"))))).is_some());
        let mut names: Vec<String> = store.state().iter().map(|p| p.metadata.name.clone().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["decoy", "mine"]);
        let mut all = elsewhere("theirs", "their-job");
        super::pod_scope(&mut all, None, |_| false);
        assert_eq!(all, elsewhere("theirs", "their-job"), "an operator of all namespaces reads them all");
    }

    #[test]
    fn a_jobs_big_input_and_schemas_stay_out_of_the_cache() {
        let job = |input: serde_json::Value| -> crate::api::AgentJob {
            serde_json::from_value(json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
                "metadata": {"name": "scan", "namespace": "team", "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
                "spec": {"category": "c", "agents": {"primary": {"name": "a", "image": "i", "model": "m"}}, "budget": {"maxCostUSD": "1"},
                    "input": input, "inputSchema": {"type": "object"}}}))
            .unwrap()
        };
        let mut small = job(json!({"repo": "x"}));
        super::job(&mut small);
        assert_eq!(small.spec.input.as_deref(), Some(&json!({"repo": "x"})));
        assert!(small.spec.input_schema.is_some() && !small.annotations().contains_key(crate::controller::agent_job::SPEC_ELIDED));
        assert_eq!(small.metadata.managed_fields, None);
        let mut big = job(json!({"blob": "y".repeat(crate::controller::agent_job::ELIDE_SPEC_OVER)}));
        super::job(&mut big);
        assert_eq!((&big.spec.input, &big.spec.input_schema, &big.spec.output_schema), (&None, &None, &None));
        assert!(big.annotations().contains_key(crate::controller::agent_job::SPEC_ELIDED));
    }

    /// What a tenant puts around a job's spec (labels, annotations, finalizers, owners, a long
    /// agent command line) is not cached: only what the operator reads is, and a mark posing as
    /// the operator's own "left out" annotation is dropped with the rest.
    #[test]
    fn a_cached_job_keeps_only_what_is_read() {
        use crate::controller::agent_job::{REQUESTED_BY, SPEC_ELIDED};
        let job = |args: Vec<String>| -> crate::api::AgentJob {
            serde_json::from_value(json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
                "metadata": {"name": "scan", "namespace": "team", "uid": "uid-1", "resourceVersion": "7", "generation": 2,
                    "creationTimestamp": "2026-11-30T10:00:00Z", "deletionTimestamp": "2026-11-30T11:00:00Z",
                    "labels": {"team": "a".repeat(63)}, "finalizers": ["example.com/hold"],
                    "annotations": {REQUESTED_BY: "alice", "note": "n".repeat(100_000), SPEC_ELIDED: ""},
                    "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "o", "uid": "u"}]},
                "spec": {"category": "c", "description": "d", "budget": {"maxCostUSD": "1"},
                    "agents": {"primary": {"name": "a", "image": "i", "model": "m", "args": args, "env": [{"name": "E", "value": "v"}]},
                        "supporting": [{"name": "b", "image": "i", "model": "m2", "command": ["run"]}]},
                    "tools": [{"name": "t"}], "resources": {"cpu": "1", "memory": "1Gi"}, "priority": 3, "input": {"repo": "x"}}}))
            .unwrap()
        };
        let full = job(vec!["--all".into()]);
        let mut small = full.clone();
        super::job(&mut small);
        let m = &small.metadata;
        assert_eq!(
            (m.name.as_deref(), m.namespace.as_deref(), m.uid.as_deref(), m.resource_version.as_deref()),
            (Some("scan"), Some("team"), Some("uid-1"), Some("7"))
        );
        assert_eq!(
            (m.generation, &m.creation_timestamp, &m.deletion_timestamp),
            (Some(2), &full.metadata.creation_timestamp, &full.metadata.deletion_timestamp)
        );
        assert_eq!((&m.labels, &m.finalizers, &m.owner_references), (&None, &None, &None));
        assert_eq!(m.annotations, None, "the tenant's mark is not kept, nor the requester (index::RequesterIndex)");
        let mut requesters = crate::controller::index::RequesterIndex::default();
        requesters.apply(&kube::runtime::watcher::Event::Apply(full.clone()));
        assert_eq!(requesters.of(full.metadata.uid.as_deref().expect("uid")).as_deref(), Some("alice"));
        assert_eq!(small.spec, full.spec, "a small spec is cached whole");

        let mut big = job(vec!["x".repeat(2000)]);
        super::job(&mut big);
        assert_eq!(big.annotations(), &[(SPEC_ELIDED.to_string(), String::new())].into());
        let agents = [&big.spec.agents.primary, &big.spec.agents.supporting[0]];
        assert!(agents.iter().all(|a| a.args.is_empty() && a.command.is_empty() && a.env.is_empty()), "{agents:?}");
        assert_eq!((&big.spec.input, &big.spec.description), (&None, &None));
        // What the indexes, wakeups and recommendations read stays.
        assert_eq!((agents[0].model.as_str(), agents[1].name.as_str(), big.spec.priority), ("m", "b", Some(3)));
        assert_eq!((big.spec.tools.len(), big.spec.resources.as_ref().map(|r| r.cpu.as_str())), (1, Some("1")));
        let heap = crate::controller::memory::heap_size::<crate::api::AgentJob>;
        assert!(heap(&big) < 4096, "{} B cached of a job of {} B", heap(&big), heap(&full));
    }

    #[test]
    fn a_slimmed_node_reads_the_same_and_is_smaller() {
        let images: Vec<serde_json::Value> = (0..50)
            .map(|i| json!({"names": [format!("registry.example.com/team/image-{i}@sha256:{}", "a".repeat(64)), format!("registry.example.com/team/image-{i}:v1")], "sizeBytes": 1000}))
            .collect();
        for (ready, unschedulable, taint) in [
            ("True", false, None),
            ("True", true, None),
            ("False", false, None),
            ("True", false, Some("NoSchedule")),
            ("True", false, Some("PreferNoSchedule")),
        ] {
            let taints: Vec<serde_json::Value> = taint.map(|effect| json!({"key": "k", "effect": effect})).into_iter().collect();
            let full: Node = serde_json::from_value(json!({"metadata": {"name": "node-a", "uid": "n-1", "resourceVersion": "9",
                    "labels": {"kubernetes.io/hostname": "node-a", "topology.kubernetes.io/zone": "z"},
                    "annotations": {"csi.volume.kubernetes.io/nodeid": "x".repeat(2000)}},
                "spec": {"podCIDR": "10.0.0.0/24", "providerID": "aws:///z/i-1", "unschedulable": unschedulable, "taints": taints},
                "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "2"}, "capacity": {"cpu": "4", "memory": "8Gi"},
                    "conditions": [{"type": "Ready", "status": ready, "reason": "KubeletReady", "message": "kubelet is posting ready status",
                        "lastHeartbeatTime": "2026-11-30T10:00:00Z", "lastTransitionTime": "2026-11-30T09:00:00Z"},
                        {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory", "message": "ok"}],
                    "images": images, "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                    "nodeInfo": {"architecture": "amd64", "bootID": "b", "containerRuntimeVersion": "containerd://2", "kernelVersion": "6",
                        "kubeProxyVersion": "", "kubeletVersion": "v1.37", "machineID": "m", "operatingSystem": "linux", "osImage": "o", "systemUUID": "s"}}}))
            .unwrap();
            let mut slim = full.clone();
            super::node(&mut slim);
            let used = crate::domain::readiness::Resources { cpu_milli: 1000, ..Default::default() };
            assert_eq!(
                snapshot::node_view(&slim, Some(&used)),
                snapshot::node_view(&full, Some(&used)),
                "{ready} {unschedulable} {taint:?}"
            );
            assert_eq!(kube::runtime::reflector::ObjectRef::from_obj(&slim), kube::runtime::reflector::ObjectRef::from_obj(&full));
            let heap = crate::controller::memory::heap_size::<Node>;
            assert!(heap(&slim) * 5 < heap(&full), "{} B of {} B kept", heap(&slim), heap(&full));
        }
    }

    #[test]
    fn a_slimmed_pod_reads_the_same_and_is_smaller() {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": "node-a"},
            "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "2"}, "conditions": [{"type": "Ready", "status": "True"}]}}))
        .unwrap();
        for phase in ["Running", "Succeeded", "Failed"] {
            let full = finished_pod(phase);
            let mut slim = full.clone();
            slim_pod(&mut slim);
            assert_eq!(snapshot::pod_view(&slim), snapshot::pod_view(&full), "{phase}");
            assert_eq!(snapshot::pod_view(&full).and_then(|v| v.generation), Some(4), "{phase}: the generation survives slimming");
            assert!(snapshot::is_job_pod(&slim, "team", "uid-1"), "{phase}: the controller ownerReference survives slimming");
            assert_eq!(snapshot::holds_node_resources(&slim), snapshot::holds_node_resources(&full), "{phase}");
            let nodes = [Arc::new(node.clone())];
            let views = snapshot::node_views(&nodes, &[Arc::new(slim.clone())]);
            assert_eq!(views, snapshot::node_views(&nodes, &[Arc::new(full.clone())]));
            if phase == "Running" {
                assert_eq!(views[0].free.cpu_milli, 4000 - 500 - 100, "the agent's 500m and its meter sidecar's 100m are taken");
            }
            assert_eq!(
                (slim.metadata.owner_references.as_ref(), slim.metadata.uid.as_ref()),
                (full.metadata.owner_references.as_ref(), full.metadata.uid.as_ref())
            );
            let size = |p: &Pod| serde_json::to_string(p).unwrap().len();
            assert!(size(&slim) * 2 < size(&full), "{} of {} bytes left", size(&slim), size(&full));
            // The store's copy: the same reads, apart from requests (the index's, from `slim`).
            let mut stored = slim.clone();
            super::stored_pod(&mut stored);
            assert_eq!(snapshot::pod_view(&stored), snapshot::pod_view(&full), "{phase}");
            // The meter's messages survive (both processes'), and that it ran.
            let meter = snapshot::pod_view(&stored).unwrap().meter;
            let tokens: Vec<i64> = meter.messages.iter().map(|m| m.usage.input_tokens).collect();
            assert!(meter.ran, "{phase}");
            assert_eq!(tokens, if phase == "Running" { vec![10] } else { vec![20, 10] }, "{phase}");
            assert!(snapshot::is_job_pod(&stored, "team", "uid-1") && super::is_agentgate_pod(&stored), "{phase}");
            assert_eq!(snapshot::holds_node_resources(&stored), snapshot::holds_node_resources(&full), "{phase}");
            assert_eq!((stored.finalizers(), stored.spec.as_ref().unwrap().node_name.as_deref()), (full.finalizers(), Some("node-a")));
            let heap = crate::controller::memory::heap_size::<Pod>;
            assert!(heap(&stored) * 2 < heap(&slim), "{phase}: stored {} B of the slimmed {} B", heap(&stored), heap(&slim));
            let mut without_meter = stored.clone();
            without_meter.status.as_mut().unwrap().init_container_statuses = None;
            println!(
                "figure: {phase}: a stored agent Pod {} B, of which its meter's status with its messages {} B",
                heap(&stored),
                heap(&stored) - heap(&without_meter)
            );
        }
    }

    /// A tenant's padded Service keeps only what discovery and the endpoint check read, and
    /// discovery decides the same from the slimmed copy.
    #[test]
    fn a_service_keeps_the_discovery_keys_and_the_first_hundred_ports_only() {
        use crate::controller::discovery::{ServiceView, desired_tool};
        use k8s_openapi::api::core::v1::Service;
        let ports: Vec<serde_json::Value> =
            (1..=3000).map(|p| json!({"name": format!("p{p}"), "port": p, "protocol": "TCP", "targetPort": p})).collect();
        let full: Service = serde_json::from_value(json!({"metadata": {"name": "search", "namespace": "tools",
            "labels": {"agentgate.dev/tool": "search", "agentgate.dev/padding": "l", "team": "a"},
            "annotations": {"agentgate.dev/padding": "x".repeat(250 * 1024), "agentgate.dev/rate-limit": " 30 ",
                            "agentgate.dev/port": "p7", "agentgate.dev/description": format!("  {}", "d".repeat(5000)), "note": "n"}},
            "spec": {"clusterIP": "None", "ports": ports}}))
        .unwrap();
        let mut slim = full.clone();
        super::service(&mut slim);
        assert_eq!(slim.labels().keys().collect::<Vec<_>>(), ["agentgate.dev/tool"]);
        let keys: Vec<&String> = slim.annotations().keys().collect();
        assert_eq!(keys, ["agentgate.dev/description", "agentgate.dev/port", "agentgate.dev/rate-limit"]);
        let kept = slim.spec.as_ref().and_then(|s| s.ports.as_ref()).unwrap();
        assert_eq!(kept.len(), super::MAX_SERVICE_PORTS);
        assert_eq!((kept[6].name.as_deref(), kept[6].port, kept[6].protocol.as_ref()), (Some("p7"), 7, None));
        let (want, _) = desired_tool(&ServiceView::of(&full).unwrap());
        let (got, problems) = desired_tool(&ServiceView::of(&slim).unwrap());
        assert_eq!((got.spec, got.error, problems), (want.spec, want.error, vec![]));
        let heap = crate::controller::memory::heap_size::<Service>;
        // 16 KB measured (100 ports of ~160 B each), of 640 KB whole.
        assert!(heap(&slim) < 20 * 1024 && heap(&slim) * 20 < heap(&full), "{} B of {} B kept", heap(&slim), heap(&full));
        // A value no rate limit, port or type could be is cut, and still refused for what it is.
        let mut long = full.clone();
        long.annotations_mut().insert("agentgate.dev/rate-limit".into(), "9".repeat(100_000));
        super::service(&mut long);
        let cut = &long.annotations()["agentgate.dev/rate-limit"];
        assert!(cut.ends_with('…') && cut.len() < 100, "{cut}");
        let (_, problems) = desired_tool(&ServiceView::of(&long).unwrap());
        assert!(problems.iter().any(|p| p.contains("agentgate.dev/rate-limit=") && p.contains("is not a whole number")), "{problems:?}");
    }

    /// A slice keeps the service-name label and each endpoint's readiness: the tool's endpoint
    /// count reads the same.
    #[test]
    fn an_endpoint_slice_keeps_its_service_name_and_readiness_only() {
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        let mut labels: serde_json::Map<String, serde_json::Value> =
            (0..1500).map(|i| (format!("pad-{i}"), json!("l".repeat(63)))).collect();
        labels.insert("kubernetes.io/service-name".into(), json!("search"));
        let endpoints: Vec<serde_json::Value> = (0..3)
            .map(|i| {
                json!({"addresses": [format!("10.0.0.{i}")], "conditions": {"ready": i != 1, "serving": true},
                            "nodeName": "node-a", "targetRef": {"kind": "Pod", "name": format!("search-{i}"), "namespace": "tools"}})
            })
            .collect();
        let full: EndpointSlice =
            serde_json::from_value(json!({"metadata": {"name": "search-abc", "namespace": "tools", "labels": labels},
            "addressType": "IPv4", "endpoints": endpoints, "ports": [{"name": "http", "port": 8080}]}))
            .unwrap();
        let mut slim = full.clone();
        super::endpoint_slice(&mut slim);
        assert_eq!(slim.labels().iter().collect::<Vec<_>>(), [(&"kubernetes.io/service-name".to_string(), &"search".to_string())]);
        let ready =
            |s: &EndpointSlice| s.endpoints.iter().flatten().map(|e| e.conditions.as_ref().and_then(|c| c.ready)).collect::<Vec<_>>();
        assert_eq!(ready(&slim), ready(&full));
        assert_eq!(ready(&slim), [Some(true), Some(false), Some(true)]);
        let heap = crate::controller::memory::heap_size::<EndpointSlice>;
        assert!(heap(&slim) * 50 < heap(&full), "{} B of {} B kept", heap(&slim), heap(&full));
    }
}
