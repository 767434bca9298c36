//! The agent Pods of one attempt, built from plain data: deterministic names (so a restarted
//! operator finds, rather than duplicates, what it created), limits, restricted security.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, Pod, PodSecurityContext, PodSpec, ResourceRequirements,
    SeccompProfile, SecretKeySelector, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::api::Agent;

pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "agentgate";
pub const LABEL_JOB_UID: &str = "agentgate.dev/job-uid";
pub const LABEL_JOB: &str = "agentgate.dev/job";
pub const LABEL_AGENT: &str = "agentgate.dev/agent";
pub const LABEL_ATTEMPT: &str = "agentgate.dev/attempt";
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";

#[derive(Clone, Debug)]
pub struct PodPlan<'a> {
    pub job_name: &'a str,
    pub namespace: &'a str,
    pub job_uid: &'a str,
    pub agent: &'a Agent,
    pub attempt: i32,
    pub cpu: &'a str,
    pub memory: &'a str,
    /// Extended resource name and count, absent when none or dropped as optional.
    pub gpu: Option<(&'a str, i32)>,
    pub deadline_seconds: i64,
    pub budget_usd: &'a str,
    pub input_json: &'a str,
    /// Tool name and URL, for AGENTGATE_TOOL_<NAME>_URL.
    pub tool_urls: &'a [(String, String)],
}

/// `<job>-<agent>-<attempt>`, shortened with a stable hash when it would exceed the Pod name limit.
pub fn pod_name(job: &str, agent: &str, attempt: i32) -> String {
    let name = format!("{job}-{agent}-{attempt}");
    if name.len() <= 253 {
        return name;
    }
    let suffix = format!("-{:08x}-{agent}-{attempt}", fnv1a(job.as_bytes()) as u32);
    let keep = 253 - suffix.len();
    format!("{}{suffix}", job[..keep].trim_end_matches(['-', '.']))
}

/// FNV-1a: a hash that never changes between Rust releases, unlike std's.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

/// `bandit-scanner` → `AGENTGATE_TOOL_BANDIT_SCANNER_URL`.
pub fn tool_env_name(tool: &str) -> String {
    format!("AGENTGATE_TOOL_{}_URL", tool.to_ascii_uppercase().replace(['-', '.'], "_"))
}

pub fn build_pod(plan: &PodPlan) -> Pod {
    let mut labels = BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
        (LABEL_JOB_UID.to_string(), plan.job_uid.to_string()),
        (LABEL_AGENT.to_string(), plan.agent.name.clone()),
        (LABEL_ATTEMPT.to_string(), plan.attempt.to_string()),
    ]);
    if plan.job_name.len() <= 63 {
        labels.insert(LABEL_JOB.to_string(), plan.job_name.to_string());
    }

    let mut limits = BTreeMap::from([
        ("cpu".to_string(), Quantity(plan.cpu.to_string())),
        ("memory".to_string(), Quantity(plan.memory.to_string())),
    ]);
    if let Some((resource, count)) = plan.gpu {
        limits.insert(resource.to_string(), Quantity(count.to_string()));
    }

    let mut env = vec![
        plain_env("AGENTGATE_JOB", plan.job_name),
        plain_env("AGENTGATE_AGENT", &plan.agent.name),
        plain_env("AGENTGATE_ATTEMPT", &plan.attempt.to_string()),
        plain_env("AGENTGATE_MODEL", &plan.agent.model),
        plain_env("AGENTGATE_BUDGET_USD", plan.budget_usd),
        plain_env("AGENTGATE_INPUT", plan.input_json),
    ];
    env.extend(plan.tool_urls.iter().map(|(tool, url)| plain_env(&tool_env_name(tool), url)));
    env.extend(plan.agent.env.iter().map(|e| EnvVar {
        name: e.name.clone(),
        value: e.value.clone(),
        value_from: e.value_from.as_ref().map(|from| EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: from.secret_key_ref.name.clone(),
                key: from.secret_key_ref.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    }));

    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(plan.job_name, &plan.agent.name, plan.attempt)),
            namespace: Some(plan.namespace.to_string()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([("agentgate.dev/job-name".to_string(), plan.job_name.to_string())])),
            owner_references: Some(vec![OwnerReference {
                api_version: "agentgate.dev/v1alpha1".into(),
                kind: "AgentJob".into(),
                name: plan.job_name.to_string(),
                uid: plan.job_uid.to_string(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            active_deadline_seconds: Some(plan.deadline_seconds),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
                ..PodSecurityContext::default()
            }),
            containers: vec![Container {
                name: "agent".into(),
                image: Some(plan.agent.image.clone()),
                command: (!plan.agent.command.is_empty()).then(|| plan.agent.command.clone()),
                args: (!plan.agent.args.is_empty()).then(|| plan.agent.args.clone()),
                env: Some(env),
                resources: Some(ResourceRequirements { requests: Some(limits.clone()), limits: Some(limits), ..ResourceRequirements::default() }),
                termination_message_policy: Some("FallbackToLogsOnError".into()),
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    privileged: Some(false),
                    run_as_non_root: Some(true),
                    capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
                    seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
                    ..SecurityContext::default()
                }),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: None,
    }
}

fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.to_string(), value: Some(value.to_string()), value_from: None }
}
