//! The agent Pods of one attempt, built from plain data: deterministic names (so a restarted
//! operator finds, rather than duplicates, what it created), limits, restricted security.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, Pod, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile,
    SecretKeySelector, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::meter_sidecar::{self, MeterSidecar};
use crate::api::Agent;

pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "agentgate";
pub const LABEL_JOB_UID: &str = "agentgate.dev/job-uid";
pub const LABEL_JOB: &str = "agentgate.dev/job";
pub const LABEL_AGENT: &str = "agentgate.dev/agent";
pub const LABEL_ATTEMPT: &str = "agentgate.dev/attempt";
/// The job's generation the Pod was built from: an attempt found only through its Pods (its status
/// write was refused or never made) is recorded with the spec it really runs.
pub const ANNOTATION_JOB_GENERATION: &str = "agentgate.dev/job-generation";
/// The agent's env var holding the `budget.maxCostUSD` its Pod was built with: that of the
/// generation the heads approved for the attempt (the meter API draws on it, meter_api.rs).
pub const ENV_BUDGET_USD: &str = "AGENTGATE_BUDGET_USD";
/// The attempt the Pod was built for, beside its label (which, unlike the env, can be changed).
pub const ENV_ATTEMPT: &str = "AGENTGATE_ATTEMPT";
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";
/// The agent container's requests and limits when the job sets no `resources`.
pub const DEFAULT_CPU: &str = "500m";
pub const DEFAULT_MEMORY: &str = "512Mi";
/// Held on every agent Pod until its attempt's result and usage are in the job's status (like the
/// Job controller's `batch.kubernetes.io/job-tracking`, KEP-2307): a Pod deleted before the
/// operator read its termination message (kubectl, PodGC, eviction, during a leader takeover)
/// stays readable, terminating, until then (controller/pod_finalizer.rs).
pub const USAGE_FINALIZER: &str = "agentgate.dev/usage-tracking";

#[derive(Clone, Debug)]
pub struct PodPlan<'a> {
    pub job_name: &'a str,
    pub namespace: &'a str,
    pub job_uid: &'a str,
    pub job_generation: i64,
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
    /// The meter every agent Pod gets (`MeterConfig::plan`).
    pub meter: &'a MeterSidecar,
}

/// Every agent Pod's name ends with this. A request to exec into, attach to, port-forward to or
/// proxy to a Pod names the Pod, not its labels, so admission can tell an agent Pod only by its
/// name: `deploy/admission/pods.yaml` refuses those requests for names with this ending
/// (tests/gate_attacks.rs `nobody_execs_into_attaches_to_or_forwards_to_an_agent_pod`).
pub const AGENT_POD_SUFFIX: &str = "-agentgate";

/// `<job>-<agent>-<attempt>-agentgate`, shortened with a stable hash when it would exceed the Pod
/// name limit (the ending is always kept).
pub fn pod_name(job: &str, agent: &str, attempt: i32) -> String {
    named(job, agent, attempt, AGENT_POD_SUFFIX)
}

/// Whether `pod` is the name of `agent`'s Pod in `attempt`: [`pod_name`], or the name it had
/// before agent Pods got [`AGENT_POD_SUFFIX`]. An attempt running while the operator is upgraded
/// keeps its Pods; they must not be created again under the new names. No Pod is ever created
/// under the old name.
pub fn is_agent_pod_name(pod: &str, job: &str, agent: &str, attempt: i32) -> bool {
    pod == pod_name(job, agent, attempt) || pod == named(job, agent, attempt, "")
}

fn named(job: &str, agent: &str, attempt: i32, ending: &str) -> String {
    let name = format!("{job}-{agent}-{attempt}{ending}");
    if name.len() <= 253 {
        return name;
    }
    let suffix = format!("-{:08x}-{agent}-{attempt}{ending}", fnv1a(job.as_bytes()) as u32);
    let keep = 253usize.saturating_sub(suffix.len()).min(job.len());
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

/// The agent Pod with its meter (domain/meter_sidecar.rs).
pub fn build_pod(plan: &PodPlan) -> Pod {
    let mut pod = build_agent_pod(plan);
    meter_sidecar::inject(&mut pod, plan.meter);
    pod
}

pub(crate) fn build_agent_pod(plan: &PodPlan) -> Pod {
    let mut labels = BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
        (LABEL_JOB_UID.to_string(), plan.job_uid.to_string()),
        (LABEL_AGENT.to_string(), plan.agent.name.clone()),
        (LABEL_ATTEMPT.to_string(), plan.attempt.to_string()),
    ]);
    if plan.job_name.len() <= 63 {
        labels.insert(LABEL_JOB.to_string(), plan.job_name.to_string());
    }

    let mut limits =
        BTreeMap::from([("cpu".to_string(), Quantity(plan.cpu.to_string())), ("memory".to_string(), Quantity(plan.memory.to_string()))]);
    if let Some((resource, count)) = plan.gpu {
        limits.insert(resource.to_string(), Quantity(count.to_string()));
    }

    let mut env = vec![
        plain_env("AGENTGATE_JOB", plan.job_name),
        plain_env("AGENTGATE_AGENT", &plan.agent.name),
        plain_env(ENV_ATTEMPT, &plan.attempt.to_string()),
        plain_env("AGENTGATE_MODEL", &plan.agent.model),
        plain_env(ENV_BUDGET_USD, plan.budget_usd),
        plain_env("AGENTGATE_INPUT", plan.input_json),
        // The report shares the kubelet's 4 KiB termination-message cap: `output` must leave room
        // for `usage` (domain/report.rs).
        plain_env("AGENTGATE_OUTPUT_MAX_BYTES", &super::report::OUTPUT_MAX_BYTES.to_string()),
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
            annotations: Some(BTreeMap::from([
                ("agentgate.dev/job-name".to_string(), plan.job_name.to_string()),
                (ANNOTATION_JOB_GENERATION.to_string(), plan.job_generation.to_string()),
            ])),
            owner_references: Some(vec![OwnerReference {
                api_version: "agentgate.dev/v1alpha1".into(),
                kind: "AgentJob".into(),
                name: plan.job_name.to_string(),
                uid: plan.job_uid.to_string(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            finalizers: Some(vec![USAGE_FINALIZER.to_string()]),
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
                resources: Some(ResourceRequirements {
                    requests: Some(limits.clone()),
                    limits: Some(limits),
                    ..ResourceRequirements::default()
                }),
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

/// A variable the operator sets, passed on literally: the kubelet expands `$(NAME)` in env values
/// (from variables set before it) and turns `$$` into `$`, so `spec.input` holding either would
/// reach the agent other than the heads approved it (`$$` escapes each `$`).
fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.to_string(), value: Some(value.replace('$', "$$")), value_from: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn test_meter() -> MeterSidecar {
        MeterSidecar {
            image: "ghcr.io/agentgate/agentgate:1".into(),
            keys_secret: "agentgate-llm-keys".into(),
            openai_key: true,
            anthropic_key: false,
            openai_upstream: None,
            anthropic_upstream: None,
            budget: meter_sidecar::MeterBudget::Fixed("0.50".into()),
            grant_ca_pem: None,
        }
    }

    /// The agent as a manifest spells it.
    fn agent() -> Agent {
        serde_json::from_value(json!({
            "name": "scanner-v2",
            "image": "ghcr.io/acme/scanner:2.1",
            "model": "gpt-4o-mini",
            "command": ["/bin/scan"],
            "args": ["--depth", "full"],
            "env": [
                {"name": "LOG_LEVEL", "value": "debug"},
                {"name": "GITHUB_TOKEN", "valueFrom": {"secretKeyRef": {"name": "gh", "key": "token"}}}
            ]
        }))
        .expect("agent fixture deserializes")
    }

    struct Fixture {
        job_name: String,
        agent: Agent,
        attempt: i32,
        gpu: Option<(&'static str, i32)>,
        deadline_seconds: i64,
        tool_urls: Vec<(String, String)>,
        input_json: &'static str,
    }

    impl Default for Fixture {
        fn default() -> Self {
            Fixture {
                job_name: "security-scan-42".into(),
                agent: agent(),
                attempt: 1,
                gpu: None,
                deadline_seconds: 600,
                tool_urls: vec![
                    ("bandit-scanner".into(), "http://bandit.tools.svc:8080".into()),
                    ("image.processor".into(), "https://img.example.com".into()),
                ],
                input_json: r#"{"repositoryPath":"/src"}"#,
            }
        }
    }

    impl Fixture {
        fn build(&self) -> Value {
            let pod = build_pod(&PodPlan {
                job_name: &self.job_name,
                namespace: "team-security",
                job_uid: "0b5c-uid",
                job_generation: 3,
                agent: &self.agent,
                attempt: self.attempt,
                cpu: "2",
                memory: "4Gi",
                gpu: self.gpu,
                deadline_seconds: self.deadline_seconds,
                budget_usd: "0.50",
                input_json: self.input_json,
                tool_urls: &self.tool_urls,
                meter: &test_meter(),
            });
            serde_json::to_value(pod).expect("a Pod serializes")
        }
    }

    enum Want {
        /// JSON pointer into the Pod: the value there, or `None` for absent.
        At(&'static str, Option<Value>),
        /// The container env var of this name, without its name: `{"value": ..}` or `{"valueFrom": ..}`.
        Env(&'static str, Option<Value>),
        /// The env var names, in order.
        EnvNames(&'static [&'static str]),
    }
    use Want::{At, Env, EnvNames};

    fn env_of(pod: &Value, name: &str) -> Option<Value> {
        pod.pointer("/spec/containers/0/env")?.as_array()?.iter().find(|e| e["name"] == name).map(|e| {
            let mut e = e.clone();
            e.as_object_mut().unwrap().remove("name");
            e
        })
    }

    struct Case {
        name: &'static str,
        fixture: Fixture,
        want: Vec<Want>,
    }

    fn cases() -> Vec<Case> {
        vec![
            Case {
                name: "name, namespace, labels and annotation",
                fixture: Fixture::default(),
                want: vec![
                    At("/metadata/name", Some(json!("security-scan-42-scanner-v2-1-agentgate"))),
                    At("/metadata/namespace", Some(json!("team-security"))),
                    At(
                        "/metadata/labels",
                        Some(json!({
                            "app.kubernetes.io/managed-by": "agentgate",
                            "agentgate.dev/job-uid": "0b5c-uid",
                            "agentgate.dev/job": "security-scan-42",
                            "agentgate.dev/agent": "scanner-v2",
                            "agentgate.dev/attempt": "1"
                        })),
                    ),
                    At("/metadata/annotations/agentgate.dev~1job-name", Some(json!("security-scan-42"))),
                    At("/metadata/annotations/agentgate.dev~1job-generation", Some(json!("3"))),
                ],
            },
            Case {
                name: "a job name too long for a label value keeps the uid label and the annotation",
                fixture: Fixture { job_name: "j".repeat(64), ..Fixture::default() },
                want: vec![
                    At("/metadata/labels/agentgate.dev~1job", None),
                    At("/metadata/labels/agentgate.dev~1job-uid", Some(json!("0b5c-uid"))),
                    At("/metadata/annotations/agentgate.dev~1job-name", Some(json!("j".repeat(64)))),
                ],
            },
            Case {
                name: "the job is the controlling owner",
                fixture: Fixture::default(),
                want: vec![At(
                    "/metadata/ownerReferences",
                    Some(json!([{
                        "apiVersion": "agentgate.dev/v1alpha1",
                        "kind": "AgentJob",
                        "name": "security-scan-42",
                        "uid": "0b5c-uid",
                        "controller": true,
                        "blockOwnerDeletion": true
                    }])),
                )],
            },
            Case {
                name: "requests equal limits for cpu and memory, no GPU unless asked",
                fixture: Fixture::default(),
                want: vec![
                    At("/spec/containers/0/resources/requests", Some(json!({"cpu": "2", "memory": "4Gi"}))),
                    At("/spec/containers/0/resources/limits", Some(json!({"cpu": "2", "memory": "4Gi"}))),
                ],
            },
            Case {
                name: "a GPU is requested under the given resource name",
                fixture: Fixture { gpu: Some(("amd.com/gpu", 2)), ..Fixture::default() },
                want: vec![
                    At("/spec/containers/0/resources/requests", Some(json!({"cpu": "2", "memory": "4Gi", "amd.com/gpu": "2"}))),
                    At("/spec/containers/0/resources/limits", Some(json!({"cpu": "2", "memory": "4Gi", "amd.com/gpu": "2"}))),
                    At("/spec/containers/0/resources/limits/nvidia.com~1gpu", None),
                ],
            },
            Case {
                name: "deadline, restart policy and no service account token",
                fixture: Fixture { deadline_seconds: 3600, ..Fixture::default() },
                want: vec![
                    At("/spec/activeDeadlineSeconds", Some(json!(3600))),
                    At("/spec/restartPolicy", Some(json!("Never"))),
                    At("/spec/automountServiceAccountToken", Some(json!(false))),
                    At("/spec/enableServiceLinks", Some(json!(false))),
                ],
            },
            Case {
                name: "restricted security context on Pod and container",
                fixture: Fixture::default(),
                want: vec![
                    At("/spec/securityContext/runAsNonRoot", Some(json!(true))),
                    At("/spec/securityContext/seccompProfile", Some(json!({"type": "RuntimeDefault"}))),
                    At(
                        "/spec/containers/0/securityContext",
                        Some(json!({
                            "allowPrivilegeEscalation": false,
                            "privileged": false,
                            "runAsNonRoot": true,
                            "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"}
                        })),
                    ),
                ],
            },
            Case {
                name: "image, command and args come from the agent",
                fixture: Fixture::default(),
                want: vec![
                    At("/spec/containers/0/name", Some(json!("agent"))),
                    At("/spec/containers/0/image", Some(json!("ghcr.io/acme/scanner:2.1"))),
                    At("/spec/containers/0/command", Some(json!(["/bin/scan"]))),
                    At("/spec/containers/0/args", Some(json!(["--depth", "full"]))),
                    At("/spec/containers/0/terminationMessagePolicy", Some(json!("FallbackToLogsOnError"))),
                ],
            },
            Case {
                name: "no command or args leaves the image's entrypoint",
                fixture: Fixture { agent: Agent { command: vec![], args: vec![], ..agent() }, ..Fixture::default() },
                want: vec![At("/spec/containers/0/command", None), At("/spec/containers/0/args", None)],
            },
            Case {
                name: "operator env, tool URLs, then the agent's own env",
                fixture: Fixture { attempt: 3, ..Fixture::default() },
                want: vec![
                    EnvNames(&[
                        "AGENTGATE_JOB",
                        "AGENTGATE_AGENT",
                        "AGENTGATE_ATTEMPT",
                        "AGENTGATE_MODEL",
                        "AGENTGATE_BUDGET_USD",
                        "AGENTGATE_INPUT",
                        "AGENTGATE_OUTPUT_MAX_BYTES",
                        "AGENTGATE_TOOL_BANDIT_SCANNER_URL",
                        "AGENTGATE_TOOL_IMAGE_PROCESSOR_URL",
                        "LOG_LEVEL",
                        "GITHUB_TOKEN",
                        "OPENAI_BASE_URL",
                        "AGENTGATE_OPENAI_BASE_URL",
                        "ANTHROPIC_BASE_URL",
                        "AGENTGATE_ANTHROPIC_BASE_URL",
                        "OPENAI_API_KEY",
                        "ANTHROPIC_API_KEY",
                        "AGENTGATE_OPENAI_API_KEY",
                        "AGENTGATE_ANTHROPIC_API_KEY",
                    ]),
                    Env("AGENTGATE_JOB", Some(json!({"value": "security-scan-42"}))),
                    Env("AGENTGATE_AGENT", Some(json!({"value": "scanner-v2"}))),
                    Env("AGENTGATE_ATTEMPT", Some(json!({"value": "3"}))),
                    Env("AGENTGATE_MODEL", Some(json!({"value": "gpt-4o-mini"}))),
                    Env("AGENTGATE_BUDGET_USD", Some(json!({"value": "0.50"}))),
                    Env("AGENTGATE_INPUT", Some(json!({"value": r#"{"repositoryPath":"/src"}"#}))),
                    Env("AGENTGATE_OUTPUT_MAX_BYTES", Some(json!({"value": "3072"}))),
                    Env("AGENTGATE_TOOL_BANDIT_SCANNER_URL", Some(json!({"value": "http://bandit.tools.svc:8080"}))),
                    Env("AGENTGATE_TOOL_IMAGE_PROCESSOR_URL", Some(json!({"value": "https://img.example.com"}))),
                    Env("LOG_LEVEL", Some(json!({"value": "debug"}))),
                    At("/metadata/name", Some(json!("security-scan-42-scanner-v2-3-agentgate"))),
                    At("/metadata/labels/agentgate.dev~1attempt", Some(json!("3"))),
                ],
            },
            Case {
                name: "a secretKeyRef stays a reference: no value is copied into the Pod",
                fixture: Fixture::default(),
                want: vec![Env(
                    "GITHUB_TOKEN",
                    Some(json!({"valueFrom": {"secretKeyRef": {"name": "gh", "key": "token", "optional": false}}})),
                )],
            },
            Case {
                name: "every agent Pod has the meter as a native sidecar, and the agent talks to it",
                fixture: Fixture::default(),
                want: vec![
                    At("/spec/initContainers/0/name", Some(json!("agentgate-meter"))),
                    At("/spec/initContainers/0/restartPolicy", Some(json!("Always"))),
                    At(
                        "/spec/initContainers/0/args",
                        Some(json!([
                            "meter",
                            "--listen",
                            "127.0.0.1:4000",
                            "--termination-message-path",
                            "/dev/termination-log",
                            "--state-file",
                            "/var/run/agentgate/meter-state/state.json",
                            "--budget-usd",
                            "0.50",
                            "--openai-key-file",
                            "/var/run/agentgate/meter-keys/openai"
                        ])),
                    ),
                    At("/spec/initContainers/1", None),
                    Env("OPENAI_BASE_URL", Some(json!({"value": "http://127.0.0.1:4000/v1"}))),
                    Env("OPENAI_API_KEY", Some(json!({"value": "agentgate-metered"}))),
                    At("/spec/containers/0/volumeMounts", None),
                    At("/spec/automountServiceAccountToken", Some(json!(false))),
                ],
            },
            Case {
                name: "operator values are escaped from the kubelet's $(VAR) expansion, the agent's own are not",
                fixture: Fixture {
                    input_json: r#"{"shell":"kill $$; echo $(AGENTGATE_JOB) $"}"#,
                    agent: Agent {
                        env: vec![serde_json::from_value(json!({"name": "GREETING", "value": "$(AGENTGATE_AGENT)"})).unwrap()],
                        ..agent()
                    },
                    ..Fixture::default()
                },
                want: vec![
                    Env("AGENTGATE_INPUT", Some(json!({"value": r#"{"shell":"kill $$$$; echo $$(AGENTGATE_JOB) $$"}"#}))),
                    Env("GREETING", Some(json!({"value": "$(AGENTGATE_AGENT)"}))),
                ],
            },
            Case {
                name: "no tools, no tool URLs",
                fixture: Fixture { tool_urls: vec![], ..Fixture::default() },
                want: vec![Env("AGENTGATE_TOOL_BANDIT_SCANNER_URL", None), Env("AGENTGATE_TOOL_IMAGE_PROCESSOR_URL", None)],
            },
        ]
    }

    #[test]
    fn pod_table() {
        let cases = cases();
        assert!(cases.len() >= 8);
        for case in cases {
            let name = case.name;
            let pod = case.fixture.build();
            for want in &case.want {
                match want {
                    At(pointer, value) => assert_eq!(pod.pointer(pointer), value.as_ref(), "{name}: {pointer}"),
                    Env(var, value) => assert_eq!(env_of(&pod, var).as_ref(), value.as_ref(), "{name}: env {var}"),
                    EnvNames(names) => {
                        let got: Vec<&str> =
                            pod["spec"]["containers"][0]["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
                        assert_eq!(got, *names, "{name}: env names");
                    }
                }
            }
        }
    }

    #[test]
    fn building_is_deterministic() {
        let f = Fixture::default();
        assert_eq!(f.build(), f.build());
    }

    #[test]
    fn pod_names_are_deterministic_bounded_and_distinct() {
        let long_a = format!("{}-a", "x".repeat(240));
        let long_b = format!("{}-b", "x".repeat(240));
        let dash_at_cut = format!("{}-{}", "a".repeat(230), "b".repeat(22));
        // (case, job, agent, attempt, exact name when short, prefix of the job kept when long)
        let cases: &[(&str, &str, &str, i32, Option<&str>)] = &[
            ("short names are joined as they are", "security-scan-42", "scanner-v2", 1, Some("security-scan-42-scanner-v2-1-agentgate")),
            ("attempt is the last part", "security-scan-42", "fixer-v2", 10, Some("security-scan-42-fixer-v2-10-agentgate")),
            ("exactly 253 characters is left alone", &"j".repeat(253 - "-agent-1-agentgate".len()), "agent", 1, None),
            ("a long job name is cut and hashed", &long_a, "scanner-v2", 1, None),
            ("a second long job sharing the cut prefix", &long_b, "scanner-v2", 1, None),
            ("a dash at the cut is trimmed", &dash_at_cut, "scanner-v2", 1, None),
        ];
        let mut seen = std::collections::BTreeMap::new();
        for (case, job, agent, attempt, exact) in cases {
            let got = pod_name(job, agent, *attempt);
            assert_eq!(got, pod_name(job, agent, *attempt), "{case}: stable across calls");
            assert!(got.len() <= 253, "{case}: {} characters", got.len());
            let tail = format!("-{agent}-{attempt}{AGENT_POD_SUFFIX}");
            assert!(got.ends_with(&tail), "{case}: {got} ends with the agent, the attempt and the agent Pods' ending");
            assert!(!got.contains("--") && !got.contains("-."), "{case}: {got} has an empty part");
            match exact {
                Some(want) => assert_eq!(got, *want, "{case}"),
                None if job.len() + tail.len() <= 253 => assert_eq!(got, format!("{job}{tail}"), "{case}: fits, not hashed"),
                None => {
                    assert_eq!(got.len() - tail.len(), got.rfind(&tail).unwrap(), "{case}");
                    let hash = &got[got.len() - tail.len() - 8..got.len() - tail.len()];
                    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()), "{case}: {got} carries a hex hash, got {hash:?}");
                    let kept = &got[..got.len() - tail.len() - 9];
                    assert!(job.starts_with(kept) && kept.len() >= 150, "{case}: {got} keeps the start of the job name");
                }
            }
            if let Some(other) = seen.insert(got.clone(), case) {
                panic!("{case}: {got} is also the name of case {other:?}");
            }
        }
        // Different attempts and agents of one long job differ too.
        assert_ne!(pod_name(&long_a, "scanner-v2", 1), pod_name(&long_a, "scanner-v2", 2));
        assert_ne!(pod_name(&long_a, "scanner-v2", 1), pod_name(&long_a, "fixer-v2", 1));
    }

    #[test]
    fn pods_named_before_the_agent_pod_ending_are_still_the_attempts() {
        assert!(is_agent_pod_name("scan-42-scanner-1", "scan-42", "scanner", 1), "an attempt started before the upgrade");
        assert!(is_agent_pod_name("scan-42-scanner-1-agentgate", "scan-42", "scanner", 1));
        assert!(!is_agent_pod_name("scan-42-scanner-2", "scan-42", "scanner", 1));
        assert!(!is_agent_pod_name("scan-42-fixer-1-agentgate", "scan-42", "scanner", 1));
        let long = "j".repeat(250);
        assert!(is_agent_pod_name(&named(&long, "scanner", 1, ""), &long, "scanner", 1));
        assert!(pod_name(&long, "scanner", 1).ends_with("-scanner-1-agentgate"));
    }

    #[test]
    fn tool_env_names() {
        let cases: &[(&str, &str, &str)] = &[
            ("dashes become underscores", "bandit-scanner", "AGENTGATE_TOOL_BANDIT_SCANNER_URL"),
            ("dots become underscores", "image.processor", "AGENTGATE_TOOL_IMAGE_PROCESSOR_URL"),
            ("plain name is upper-cased", "mcp", "AGENTGATE_TOOL_MCP_URL"),
            ("digits are kept", "tool2-v3.x", "AGENTGATE_TOOL_TOOL2_V3_X_URL"),
        ];
        for (case, tool, want) in cases {
            assert_eq!(tool_env_name(tool), *want, "{case}");
        }
    }
}
