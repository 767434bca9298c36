//! The meter in an agent Pod: a native sidecar (an init container with `restartPolicy: Always`,
//! so it starts before the agent and outlives it to record the last call), listening on
//! loopback. The agent gets base URLs pointing at it and a dummy key; the real keys come from a
//! Secret mounted into the meter's container only.
//!
//! Where keys and upstreams come from (README "The agent meter"):
//! - the admin names the keys Secret cluster-wide (`--meter-keys-secret`, default
//!   [`DEFAULT_KEYS_SECRET`]) and the default upstreams (`--meter-openai-upstream`,
//!   `--meter-anthropic-upstream`; none: the providers' public APIs);
//! - each namespace holds its own Secret of that name (a Pod mounts only Secrets of its own
//!   namespace): the team creates it, or the admin copies one in. Keys `openai` and `anthropic`;
//!   the annotations [`ANNOTATION_OPENAI_UPSTREAM`] and [`ANNOTATION_ANTHROPIC_UPSTREAM`] on it
//!   override the upstreams for that namespace. The upstream lives on the key's own Secret on
//!   purpose: only who may write the key may say where it is sent (a ConfigMap naming the
//!   upstream would let anyone who may edit ConfigMaps ship the team's key to their own server).
//! - a namespace without the Secret (or with neither key) still gets the meter, keyless: calls are
//!   metered and held to the budget, and go upstream with the dummy key, so the provider refuses
//!   them (401). The agent never receives a real key from the operator in any case: an agent
//!   holding one could call the provider directly, past the meter, and neither the usage nor the
//!   budget would hold. The operator says so with a `MeterKeysMissing` Warning Event.

use std::collections::BTreeMap;
use std::str::FromStr;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, ExecAction, KeyToPath, Pod, Probe, ProjectedVolumeSource, ResourceRequirements,
    SeccompProfile, SecretVolumeSource, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

pub const CONTAINER: &str = "agentgate-meter";
pub const PORT: u16 = 4000;
/// The agentgate binary in the meter's image (deploy/images/build.sh), run by the startup probe.
pub const BINARY: &str = "/usr/local/bin/agentgate";
/// The meter's health endpoint, on its loopback listener.
pub const HEALTH_PATH: &str = "/healthz";
/// The meter's CA certificate for the meter API (PEM), in its container's environment.
pub const GRANT_CA_ENV: &str = "AGENTGATE_METER_GRANT_CA_PEM";
/// The meter's termination message, where it keeps its usage for the operator to read from the
/// Pod's status (domain/meter_message.rs): the kubelet's own file for this container, which no
/// other container mounts.
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
/// The meter's state file (src/meter/state_file.rs), from which a restarted meter process
/// carries on its Pod's session: on an emptyDir, which survives container restarts, mounted by
/// the meter's container alone (the agent's could not read or write it).
pub const STATE_VOLUME: &str = "agentgate-meter-state";
pub const STATE_DIR: &str = "/var/run/agentgate/meter-state";
pub const STATE_FILE: &str = "/var/run/agentgate/meter-state/state.json";
pub const KEYS_VOLUME: &str = "agentgate-meter-keys";
pub const KEYS_DIR: &str = "/var/run/agentgate/meter-keys";
pub const TOKEN_VOLUME: &str = "agentgate-meter-token";
pub const TOKEN_DIR: &str = "/var/run/agentgate/meter-token";
/// The meter's credential towards the operator (grants, usage reports): a projected
/// ServiceAccount token for this audience only, so it is worth nothing to the apiserver or any
/// other service, and bound to the Pod (void once the Pod is gone).
pub const TOKEN_AUDIENCE: &str = "agentgate.dev/meter";
/// The shortest expiry the apiserver accepts; the kubelet renews the file at 80% of it.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 600;
pub const DEFAULT_KEYS_SECRET: &str = "agentgate-llm-keys";
/// Keys of the keys Secret.
pub const OPENAI_KEY: &str = "openai";
pub const ANTHROPIC_KEY: &str = "anthropic";
pub const ANNOTATION_OPENAI_UPSTREAM: &str = "agentgate.dev/openai-upstream";
pub const ANNOTATION_ANTHROPIC_UPSTREAM: &str = "agentgate.dev/anthropic-upstream";
/// What SDKs find in the agent's environment instead of a key: they insist on one being set.
pub const DUMMY_KEY: &str = "agentgate-metered";
/// Names under which SDKs and agents look for keys and endpoints; the meter sets them all.
const KEY_VARS: [&str; 4] = ["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AGENTGATE_OPENAI_API_KEY", "AGENTGATE_ANTHROPIC_API_KEY"];

/// Where the meter's budget comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetMode {
    /// The job's whole `maxCostUSD`, held by each meter alone (`--budget-usd`): N agents of a job
    /// may together spend up to N times it.
    Fixed,
    /// Grants from the operator's meter API (`--grant-url`), shared by every meter of the job.
    Grants,
}

impl FromStr for BudgetMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fixed" => Ok(BudgetMode::Fixed),
            "grants" => Ok(BudgetMode::Grants),
            other => Err(format!("{other:?} is not a meter budget mode (fixed or grants)")),
        }
    }
}

/// The meter's configuration for the whole cluster, from the operator's flags.
#[derive(Clone, Debug, PartialEq)]
pub struct MeterConfig {
    pub image: String,
    /// Name of the keys Secret looked up in each job's namespace.
    pub keys_secret: String,
    /// Default upstreams; None: the meter's own defaults (the providers' public APIs).
    pub openai_upstream: Option<String>,
    pub anthropic_upstream: Option<String>,
    pub budget_mode: BudgetMode,
    pub grant_url: String,
}

/// What a namespace's keys Secret offers: which keys it holds (never their values) and the
/// upstreams its annotations name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NamespaceKeys {
    pub openai: bool,
    pub anthropic: bool,
    pub openai_upstream: Option<String>,
    pub anthropic_upstream: Option<String>,
}

impl NamespaceKeys {
    /// From the Secret's data keys (names only) and annotations.
    pub fn from_secret<'a>(data_keys: impl IntoIterator<Item = &'a str>, annotations: &BTreeMap<String, String>) -> NamespaceKeys {
        let keys: Vec<&str> = data_keys.into_iter().collect();
        NamespaceKeys {
            openai: keys.contains(&OPENAI_KEY),
            anthropic: keys.contains(&ANTHROPIC_KEY),
            openai_upstream: annotations.get(ANNOTATION_OPENAI_UPSTREAM).cloned(),
            anthropic_upstream: annotations.get(ANNOTATION_ANTHROPIC_UPSTREAM).cloned(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum MeterBudget {
    /// `--budget-usd` with this amount.
    Fixed(String),
    /// `--grant-url` with this URL.
    Grants(String),
}

/// One agent Pod's meter, as [`MeterConfig::plan`] decides it.
#[derive(Clone, Debug, PartialEq)]
pub struct MeterSidecar {
    pub image: String,
    /// The keys Secret's name: mounted into the meter when it holds a key, and in any case never
    /// referenced by the agent container.
    pub keys_secret: String,
    pub openai_key: bool,
    pub anthropic_key: bool,
    pub openai_upstream: Option<String>,
    pub anthropic_upstream: Option<String>,
    pub budget: MeterBudget,
    /// The CA certificate (PEM) the meter API serves under when the Pod is built
    /// (controller/meter_tls.rs), which the meter trusts alone; used with [`MeterBudget::Grants`].
    /// None from [`MeterConfig::plan`]: the shell sets it, as the CA may change while it runs.
    /// None with a plain-HTTP meter API (`--meter-api-tls off`).
    pub grant_ca_pem: Option<String>,
}

/// A problem with the namespace's meter configuration, for a Warning Event on the job (the Pod
/// is still created: see the module's documentation).
#[derive(Clone, Debug, PartialEq)]
pub struct MeterWarning {
    pub reason: &'static str,
    pub message: String,
}

impl MeterConfig {
    /// The meter of a Pod in `namespace`, given what its keys Secret offers (None: no such
    /// Secret, or the operator may not read it).
    pub fn plan(&self, namespace: &str, keys: Option<&NamespaceKeys>, budget_usd: &str) -> (MeterSidecar, Vec<MeterWarning>) {
        let mut warnings = Vec::new();
        let found = keys.cloned().unwrap_or_default();
        if !found.openai && !found.anthropic {
            let what =
                if keys.is_some() { "holds neither key openai nor anthropic" } else { "does not exist (or the operator may not read it)" };
            warnings.push(MeterWarning {
                reason: "MeterKeysMissing",
                message: format!(
                    "Secret {namespace}/{} {what}: the agent's meter has no provider key, so its model calls are refused upstream; \
                     create it with keys openai and/or anthropic",
                    self.keys_secret
                ),
            });
        }
        let mut upstream = |annotation: &str, wanted: Option<String>, default: &Option<String>| match wanted {
            Some(url) if is_upstream_url(&url) => Some(url),
            Some(url) => {
                warnings.push(MeterWarning {
                    reason: "MeterUpstreamInvalid",
                    message: format!(
                        "annotation {annotation} of Secret {namespace}/{} is {url:?}, not an http(s) URL: the cluster's default upstream is used",
                        self.keys_secret
                    ),
                });
                default.clone()
            }
            None => default.clone(),
        };
        let openai_upstream = upstream(ANNOTATION_OPENAI_UPSTREAM, found.openai_upstream.clone(), &self.openai_upstream);
        let anthropic_upstream = upstream(ANNOTATION_ANTHROPIC_UPSTREAM, found.anthropic_upstream.clone(), &self.anthropic_upstream);
        let budget = match self.budget_mode {
            BudgetMode::Fixed => MeterBudget::Fixed(budget_usd.to_string()),
            BudgetMode::Grants => MeterBudget::Grants(self.grant_url.clone()),
        };
        let sidecar = MeterSidecar {
            image: self.image.clone(),
            keys_secret: self.keys_secret.clone(),
            openai_key: found.openai,
            anthropic_key: found.anthropic,
            openai_upstream,
            anthropic_upstream,
            budget,
            grant_ca_pem: None,
        };
        (sidecar, warnings)
    }
}

/// An absolute http(s) URL with a host and nothing a flag or header could be confused by.
fn is_upstream_url(url: &str) -> bool {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/')) && url.len() <= 2048 && url.chars().all(|c| c.is_ascii_graphic())
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.to_string(), value: Some(value.to_string()), value_from: None }
}

fn restricted() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        run_as_non_root: Some(true),
        // The image's nonroot user, set explicitly: runAsNonRoot needs a numeric user.
        run_as_user: Some(65532),
        run_as_group: Some(65532),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
        ..SecurityContext::default()
    }
}

/// The meter container's requests and limits (100m CPU, 64 MiB). The operator's capacity and
/// quota checks count them with the agent's (domain/snapshot.rs `pod_need`).
pub fn resources() -> ResourceRequirements {
    let small = Some(BTreeMap::from([("cpu".to_string(), Quantity("100m".into())), ("memory".to_string(), Quantity("64Mi".into()))]));
    ResourceRequirements { requests: small.clone(), limits: small, ..Default::default() }
}

/// Adds the meter to an agent Pod built by `pod_builder::build_pod` (which calls it).
pub fn inject(pod: &mut Pod, meter: &MeterSidecar) {
    let Some(spec) = pod.spec.as_mut() else { return };
    let mut args = vec![
        "meter".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{PORT}"),
        "--termination-message-path".into(),
        TERMINATION_MESSAGE_PATH.into(),
        "--state-file".into(),
        STATE_FILE.into(),
    ];
    match &meter.budget {
        MeterBudget::Fixed(usd) => args.extend(["--budget-usd".into(), usd.clone()]),
        MeterBudget::Grants(url) => {
            args.extend(["--grant-url".into(), url.clone()]);
            // Only when the admin turned the meter API's TLS off (the operator checks the URL
            // matches): the meter refuses a plain-HTTP grant URL otherwise.
            if url.starts_with("http://") {
                args.push("--grant-insecure-http".into());
            }
        }
    }
    let mut meter_env = Vec::new();
    if let (MeterBudget::Grants(_), Some(ca)) = (&meter.budget, &meter.grant_ca_pem) {
        meter_env.push(env(GRANT_CA_ENV, ca));
    }
    let mut items = Vec::new();
    for (wanted, provider) in [(meter.openai_key, OPENAI_KEY), (meter.anthropic_key, ANTHROPIC_KEY)] {
        if wanted {
            args.extend([format!("--{provider}-key-file"), format!("{KEYS_DIR}/{provider}")]);
            items.push(KeyToPath { key: provider.into(), path: provider.into(), ..KeyToPath::default() });
        }
    }
    for (upstream, flag) in [(&meter.openai_upstream, "--openai-upstream"), (&meter.anthropic_upstream, "--anthropic-upstream")] {
        if let Some(url) = upstream {
            args.extend([flag.to_string(), url.clone()]);
        }
    }
    let mut mounts = vec![
        VolumeMount { name: TOKEN_VOLUME.into(), mount_path: TOKEN_DIR.into(), read_only: Some(true), ..Default::default() },
        VolumeMount { name: STATE_VOLUME.into(), mount_path: STATE_DIR.into(), ..Default::default() },
    ];
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    // A file of a few hundred bytes (a few KiB with many models), on the node's disk: a memory
    // medium would count against the meter's 64 MiB. The limit bounds what a runaway meter could
    // write; the kubelet evicts the Pod past it.
    volumes.push(Volume {
        name: STATE_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource { size_limit: Some(Quantity("1Mi".into())), ..EmptyDirVolumeSource::default() }),
        ..Volume::default()
    });
    // World-readable files, yet only the meter's container mounts them: other containers of the
    // Pod have their own mount namespace and cannot see them.
    volumes.push(Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o444),
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(TOKEN_AUDIENCE.into()),
                    expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                    path: "token".into(),
                    ..ServiceAccountTokenProjection::default()
                }),
                ..VolumeProjection::default()
            }]),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    });
    if !items.is_empty() {
        mounts.push(VolumeMount { name: KEYS_VOLUME.into(), mount_path: KEYS_DIR.into(), read_only: Some(true), ..Default::default() });
        volumes.push(Volume {
            name: KEYS_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(meter.keys_secret.clone()),
                items: Some(items),
                default_mode: Some(0o444),
                optional: Some(false),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    spec.init_containers.get_or_insert_with(Vec::new).push(Container {
        name: CONTAINER.into(),
        image: Some(meter.image.clone()),
        args: Some(args),
        // Native sidecar: started before the agent, stopped after it, so the agent's last call
        // is measured even when the agent is OOM-killed or stopped at its deadline.
        restart_policy: Some("Always".into()),
        // Requests equal limits, as the agent's: the Pod stays in the Guaranteed QoS class (every
        // container must match; tests/real_node.rs saw the runaway agent's Pod turn Burstable).
        // Idle RSS is about 11 MiB; the rest is room for bodies in flight. A native sidecar's
        // requests add to the Pod's, so the scheduler and quotas count them.
        resources: Some(resources()),
        volume_mounts: Some(mounts),
        security_context: Some(restricted()),
        env: (!meter_env.is_empty()).then_some(meter_env),
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
        // The file only, never the log: the meter's log is no usage figure.
        termination_message_policy: Some("File".into()),
        // The kubelet starts the agent once this succeeds: the agent's first call finds the
        // meter listening (tests/real_node_meter.rs calls once, without retrying). An exec probe,
        // because the meter listens on the Pod's loopback only, which the kubelet's HTTP probes
        // (to the Pod IP) cannot reach. No liveness probe: a crashed meter is restarted anyway
        // (restartPolicy Always), and an exec every few seconds in every agent Pod costs the
        // node more than it would save: a hung meter stalls its agent until the job's deadline,
        // which ends the Pod anyway.
        startup_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec![BINARY.into(), "meter-probe".into(), format!("http://127.0.0.1:{PORT}{HEALTH_PATH}")]),
            }),
            // The probe keeps asking for 1.5 s within its 2 s timeout (src/meter/mod.rs probe),
            // so the agent starts milliseconds after the meter listens, not a period later.
            period_seconds: Some(1),
            timeout_seconds: Some(2),
            failure_threshold: Some(60),
            ..Probe::default()
        }),
        ..Container::default()
    });
    let openai = format!("http://127.0.0.1:{PORT}/v1");
    let anthropic = format!("http://127.0.0.1:{PORT}");
    let ours = [
        ("OPENAI_BASE_URL", openai.as_str()),
        ("AGENTGATE_OPENAI_BASE_URL", openai.as_str()),
        ("ANTHROPIC_BASE_URL", anthropic.as_str()),
        ("AGENTGATE_ANTHROPIC_BASE_URL", anthropic.as_str()),
    ];
    // Volumes other than the meter's own that carry the keys Secret, directly or projected.
    let key_volumes: Vec<String> =
        spec.volumes.iter().flatten().filter(|v| carries_secret(v, &meter.keys_secret)).map(|v| v.name.clone()).collect();
    for agent in &mut spec.containers {
        let vars = agent.env.get_or_insert_with(Vec::new);
        // The agent's own settings of these names (a key from a Secret, another endpoint) would
        // bypass the meter: the meter's replace them, and nothing may reference its Secret.
        vars.retain(|e| {
            !KEY_VARS.contains(&e.name.as_str())
                && !ours.iter().any(|(n, _)| *n == e.name)
                && e.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).is_none_or(|s| s.name != meter.keys_secret)
        });
        vars.extend(ours.iter().map(|(n, v)| env(n, v)));
        vars.extend(KEY_VARS.iter().map(|n| env(n, DUMMY_KEY)));
        if let Some(from) = agent.env_from.as_mut() {
            from.retain(|f| f.secret_ref.as_ref().is_none_or(|s| s.name != meter.keys_secret));
        }
        // The agent container mounts neither the meter's volumes nor any other carrying its keys.
        if let Some(mounts) = agent.volume_mounts.as_mut() {
            mounts.retain(|m| ![KEYS_VOLUME, TOKEN_VOLUME, STATE_VOLUME].contains(&m.name.as_str()) && !key_volumes.contains(&m.name));
        }
    }
}

fn carries_secret(volume: &Volume, secret: &str) -> bool {
    let direct = volume.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(secret);
    let projected = volume
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_ref())
        .is_some_and(|sources| sources.iter().any(|s| s.secret.as_ref().is_some_and(|s| s.name == secret)));
    direct || projected
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Agent;
    use crate::domain::pod_builder::{PodPlan, build_agent_pod};
    use k8s_openapi::api::core::v1::{EnvFromSource, EnvVarSource, SecretEnvSource, SecretKeySelector, SecretProjection};

    fn config() -> MeterConfig {
        MeterConfig {
            image: "ghcr.io/agentgate/agentgate:1".into(),
            keys_secret: "llm-keys".into(),
            openai_upstream: Some("https://llm-gateway.internal/v1".into()),
            anthropic_upstream: None,
            budget_mode: BudgetMode::Fixed,
            grant_url: "https://agentgate-meter-api.agentgate-system.svc:8444".into(),
        }
    }

    fn both_keys() -> NamespaceKeys {
        let annotations = BTreeMap::from([(ANNOTATION_ANTHROPIC_UPSTREAM.to_string(), "https://gateway.internal".to_string())]);
        NamespaceKeys::from_secret(["openai", "anthropic", "unrelated"], &annotations)
    }

    const CA: &str = "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n";

    /// [`config`]'s meter for a namespace with both keys, with the CA the shell adds.
    fn meter() -> MeterSidecar {
        let (sidecar, warnings) = config().plan("ns", Some(&both_keys()), "5.00");
        assert_eq!(warnings, []);
        assert_eq!(sidecar.grant_ca_pem, None, "the CA is the shell's to set");
        MeterSidecar { grant_ca_pem: Some(CA.into()), ..sidecar }
    }

    /// The agent's Pod before injection, as `build_pod` makes it.
    fn pod() -> Pod {
        let agent: Agent = serde_json::from_value(serde_json::json!({
            "name": "coder", "image": "agent:1", "model": "gpt-4o",
            "env": [{"name": "GITHUB_TOKEN", "valueFrom": {"secretKeyRef": {"name": "gh", "key": "token"}}}]
        }))
        .unwrap();
        let meter = meter();
        let plan = PodPlan {
            job_name: "j",
            namespace: "ns",
            job_uid: "u",
            job_generation: 1,
            agent: &agent,
            attempt: 1,
            cpu: "1",
            memory: "1Gi",
            gpu: None,
            deadline_seconds: 60,
            budget_usd: "5.00",
            input_json: "{}",
            tool_urls: &[],
            meter: &meter,
        };
        build_agent_pod(&plan)
    }

    fn env_of<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
        c.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.as_deref())
    }

    #[test]
    fn the_meter_is_a_native_sidecar_on_loopback_with_the_keys() {
        let mut pod = pod();
        inject(&mut pod, &meter());
        let spec = pod.spec.unwrap();
        let sidecar = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        let args = sidecar.args.as_ref().unwrap().join(" ");
        assert!(
            args.starts_with(
                "meter --listen 127.0.0.1:4000 --termination-message-path /dev/termination-log \
                 --state-file /var/run/agentgate/meter-state/state.json --budget-usd 5.00"
            ),
            "{args}"
        );
        assert_eq!(
            (sidecar.termination_message_path.as_deref(), sidecar.termination_message_policy.as_deref()),
            (Some(TERMINATION_MESSAGE_PATH), Some("File"))
        );
        assert!(args.contains("--openai-key-file /var/run/agentgate/meter-keys/openai"));
        assert!(args.contains("--anthropic-key-file /var/run/agentgate/meter-keys/anthropic"));
        assert!(args.contains("--openai-upstream https://llm-gateway.internal/v1"), "the cluster's default: {args}");
        assert!(args.contains("--anthropic-upstream https://gateway.internal"), "the namespace's override: {args}");
        // The agent starts once the meter answers on loopback.
        let probe = sidecar.startup_probe.as_ref().unwrap();
        let command = probe.exec.as_ref().unwrap().command.clone().unwrap();
        assert_eq!(command, [BINARY, "meter-probe", "http://127.0.0.1:4000/healthz"]);
        assert_eq!(env_of(sidecar, GRANT_CA_ENV), None, "a fixed budget needs no CA");
        let resources = sidecar.resources.as_ref().unwrap();
        assert_eq!(resources.requests, resources.limits, "requests equal limits: the Pod stays Guaranteed");
        let mounts: Vec<_> = sidecar.volume_mounts.iter().flatten().map(|m| (m.mount_path.as_str(), m.read_only)).collect();
        assert_eq!(mounts, [(TOKEN_DIR, Some(true)), (STATE_DIR, None), (KEYS_DIR, Some(true))]);
        // The state file's volume: survives the meter's restarts, on disk, bounded.
        let state = spec.volumes.iter().flatten().find(|v| v.name == STATE_VOLUME).and_then(|v| v.empty_dir.as_ref()).unwrap();
        assert_eq!((state.medium.as_deref(), state.size_limit.as_ref().map(|q| q.0.as_str())), (None, Some("1Mi")));
        assert_eq!(format!("{STATE_DIR}/state.json"), STATE_FILE);
        let agent = &spec.containers[0];
        assert_eq!(env_of(agent, "OPENAI_BASE_URL"), Some("http://127.0.0.1:4000/v1"));
        assert_eq!(env_of(agent, "ANTHROPIC_BASE_URL"), Some("http://127.0.0.1:4000"));
        assert_eq!(env_of(agent, "AGENTGATE_OPENAI_BASE_URL"), Some("http://127.0.0.1:4000/v1"));
        assert_eq!(env_of(agent, "OPENAI_API_KEY"), Some(DUMMY_KEY));
        assert_eq!(env_of(agent, "ANTHROPIC_API_KEY"), Some(DUMMY_KEY));
        assert!(agent.env.iter().flatten().any(|e| e.name == "GITHUB_TOKEN"), "the agent's other secrets stay");
    }

    #[test]
    fn the_meter_alone_mounts_a_token_for_its_own_audience_and_the_pod_automounts_none() {
        let mut pod = pod();
        inject(&mut pod, &MeterSidecar { budget: MeterBudget::Grants("https://api.ns.svc:8444".into()), ..meter() });
        let spec = pod.spec.unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false), "no token in any container but the one mounted below");
        let token = spec.volumes.iter().flatten().find(|v| v.name == TOKEN_VOLUME).and_then(|v| v.projected.as_ref()).unwrap();
        let projection = token.sources.as_ref().unwrap()[0].service_account_token.as_ref().unwrap();
        assert_eq!(projection.audience.as_deref(), Some(TOKEN_AUDIENCE));
        assert_eq!(projection.expiration_seconds, Some(600));
        assert_eq!(format!("{TOKEN_DIR}/{}", projection.path), "/var/run/agentgate/meter-token/token", "where the meter reads it");
        let sidecar = &spec.init_containers.as_ref().unwrap()[0];
        let args = sidecar.args.as_ref().unwrap().join(" ");
        assert!(args.contains("--grant-url https://api.ns.svc:8444") && !args.contains("--budget-usd"), "{args}");
        assert!(!args.contains("--grant-insecure-http"), "{args}");
        assert_eq!(env_of(sidecar, GRANT_CA_ENV), Some(CA), "the meter trusts the operator's CA");
        assert_eq!(env_of(&spec.containers[0], GRANT_CA_ENV), None);
        // A plain-HTTP meter API (TLS turned off by the admin) is said so explicitly.
        let mut plain = super::tests::pod();
        inject(&mut plain, &MeterSidecar { budget: MeterBudget::Grants("http://api.ns.svc:8444".into()), grant_ca_pem: None, ..meter() });
        let args = plain.spec.unwrap().init_containers.unwrap()[0].args.clone().unwrap().join(" ");
        assert!(args.contains("--grant-url http://api.ns.svc:8444 --grant-insecure-http"), "{args}");
        for c in &spec.containers {
            assert!(c.volume_mounts.iter().flatten().all(|m| m.name != TOKEN_VOLUME), "{} mounts the meter's token", c.name);
        }
    }

    /// The meter's termination message is its usage for the operator (domain/meter_message.rs):
    /// the agent must not be able to write it. It is the kubelet's file for the meter's container
    /// alone; the agent shares no volume with the meter and mounts nothing over `/dev`.
    #[test]
    fn the_agent_container_cannot_reach_the_meters_termination_message() {
        let mut pod = pod();
        inject(&mut pod, &meter());
        let spec = pod.spec.unwrap();
        let sidecar = &spec.init_containers.as_ref().unwrap()[0];
        let meter_volumes: Vec<&str> = sidecar.volume_mounts.iter().flatten().map(|m| m.name.as_str()).collect();
        for agent in &spec.containers {
            for mount in agent.volume_mounts.iter().flatten() {
                assert!(!meter_volumes.contains(&mount.name.as_str()), "the agent mounts the meter's volume {}", mount.name);
                assert!(!mount.mount_path.starts_with("/dev"), "the agent mounts {} over /dev", mount.mount_path);
            }
        }
        assert_eq!(sidecar.termination_message_path.as_deref(), Some(TERMINATION_MESSAGE_PATH));
        assert_eq!(spec.share_process_namespace, None, "the agent cannot reach the meter's filesystem through /proc");
    }

    #[test]
    fn no_key_is_reachable_from_the_agent_container_even_if_its_spec_asks() {
        let mut pod = pod();
        let spec = pod.spec.as_mut().unwrap();
        // An agent spec trying to get the keys every way a container can.
        let secret_ref = |name: &str| EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: "llm-keys".into(), key: name.into(), optional: None }),
            ..Default::default()
        };
        let agent = &mut spec.containers[0];
        agent.env.get_or_insert_with(Vec::new).extend([
            EnvVar { name: "OPENAI_API_KEY".into(), value: None, value_from: Some(secret_ref("openai")) },
            EnvVar { name: "SNEAKY".into(), value: None, value_from: Some(secret_ref("anthropic")) },
            EnvVar { name: "OPENAI_BASE_URL".into(), value: Some("https://api.openai.com/v1".into()), value_from: None },
        ]);
        agent.env_from = Some(vec![EnvFromSource {
            secret_ref: Some(SecretEnvSource { name: "llm-keys".into(), optional: None }),
            ..Default::default()
        }]);
        spec.volumes = Some(vec![
            Volume {
                name: "k".into(),
                secret: Some(SecretVolumeSource { secret_name: Some("llm-keys".into()), ..Default::default() }),
                ..Default::default()
            },
            Volume {
                name: "p".into(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![VolumeProjection {
                        secret: Some(SecretProjection { name: "llm-keys".into(), ..Default::default() }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]);
        agent.volume_mounts = Some(vec![
            VolumeMount { name: "k".into(), mount_path: "/keys".into(), ..Default::default() },
            VolumeMount { name: "p".into(), mount_path: "/projected".into(), ..Default::default() },
            VolumeMount { name: KEYS_VOLUME.into(), mount_path: "/stolen".into(), ..Default::default() },
            VolumeMount { name: TOKEN_VOLUME.into(), mount_path: "/token".into(), ..Default::default() },
            // The meter's state file: writing it would let the agent lower what a restarted meter
            // resumes from (src/meter/state_file.rs).
            VolumeMount { name: STATE_VOLUME.into(), mount_path: "/state".into(), ..Default::default() },
        ]);
        inject(&mut pod, &meter());
        let spec = pod.spec.unwrap();
        let agent = serde_json::to_value(&spec.containers[0]).unwrap();
        let text = agent.to_string();
        assert!(!text.contains("llm-keys"), "the agent container references the keys' Secret: {text}");
        assert!(agent["volumeMounts"].as_array().is_none_or(|m| m.is_empty()), "{text}");
        assert_eq!(env_of(&spec.containers[0], "OPENAI_BASE_URL"), Some("http://127.0.0.1:4000/v1"));
        let names: Vec<_> = spec.containers[0].env.iter().flatten().map(|e| e.name.as_str()).collect();
        assert_eq!(names.iter().filter(|n| **n == "OPENAI_API_KEY").count(), 1);
    }

    #[test]
    fn restricted_pod_security_still_holds_for_every_container() {
        let mut pod = pod();
        inject(&mut pod, &meter());
        let spec = pod.spec.unwrap();
        for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
            assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
            assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]), "{}", c.name);
            assert!(sc.capabilities.as_ref().unwrap().add.is_none());
            assert_ne!(sc.run_as_user, Some(0));
            assert!(c.ports.is_none(), "{}: nothing listens beyond loopback", c.name);
        }
        // Restricted allows these volume types only; the meter adds a Secret and a projected token.
        for v in spec.volumes.iter().flatten() {
            assert!(v.secret.is_some() || v.config_map.is_some() || v.empty_dir.is_some() || v.projected.is_some(), "{}", v.name);
        }
        assert!(spec.host_network.is_none() && spec.host_pid.is_none());
    }

    #[test]
    fn where_keys_and_upstreams_come_from() {
        let c = config();
        let keyless = |keys: Option<&NamespaceKeys>| {
            let (sidecar, warnings) = c.plan("team-a", keys, "1.00");
            assert!(!sidecar.openai_key && !sidecar.anthropic_key);
            let mut pod = pod();
            inject(&mut pod, &sidecar);
            let spec = pod.spec.unwrap();
            assert!(spec.volumes.iter().flatten().all(|v| v.secret.is_none()), "no Secret volume that could not mount");
            let args = spec.init_containers.unwrap()[0].args.clone().unwrap().join(" ");
            assert!(!args.contains("key-file"), "{args}");
            assert_eq!(env_of(&spec.containers[0], "OPENAI_API_KEY"), Some(DUMMY_KEY), "still no key for the agent");
            warnings
        };
        // No Secret: keyless, and said so, naming the Secret expected.
        let warnings = keyless(None);
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].reason, "MeterKeysMissing");
        assert!(warnings[0].message.contains("Secret team-a/llm-keys does not exist"), "{}", warnings[0].message);
        // A Secret with neither key: the same, with the reason.
        let warnings = keyless(Some(&NamespaceKeys::from_secret(["api-key"], &BTreeMap::new())));
        assert!(warnings[0].message.contains("holds neither key openai nor anthropic"), "{}", warnings[0].message);

        // One key: only it is mounted and passed.
        let (sidecar, warnings) = c.plan("team-a", Some(&NamespaceKeys::from_secret(["anthropic"], &BTreeMap::new())), "1.00");
        assert_eq!(warnings, []);
        assert_eq!((sidecar.openai_key, sidecar.anthropic_key), (false, true));
        assert_eq!(sidecar.openai_upstream.as_deref(), Some("https://llm-gateway.internal/v1"), "the cluster's default");
        assert_eq!(sidecar.anthropic_upstream, None, "the meter's own default");

        // The namespace's annotations win; a bad one is reported and the default kept.
        for (bad, why) in [("ftp://x", "scheme"), ("https://", "no host"), ("https://a b", "space"), ("--openai-key-file=/etc/x", "a flag")]
        {
            let annotations = BTreeMap::from([
                (ANNOTATION_OPENAI_UPSTREAM.to_string(), bad.to_string()),
                (ANNOTATION_ANTHROPIC_UPSTREAM.to_string(), "http://10.0.0.1:8000".to_string()),
            ]);
            let (sidecar, warnings) = c.plan("team-a", Some(&NamespaceKeys::from_secret(["openai"], &annotations)), "1.00");
            assert_eq!(sidecar.openai_upstream.as_deref(), Some("https://llm-gateway.internal/v1"), "{why}");
            assert_eq!(sidecar.anthropic_upstream.as_deref(), Some("http://10.0.0.1:8000"), "{why}");
            assert_eq!(warnings.len(), 1, "{why}");
            assert_eq!(warnings[0].reason, "MeterUpstreamInvalid", "{why}");
        }

        // The budget mode: the job's whole budget, or the operator's grants.
        assert_eq!(c.plan("ns", None, "2.50").0.budget, MeterBudget::Fixed("2.50".into()));
        let grants = MeterConfig { budget_mode: BudgetMode::Grants, ..c.clone() };
        assert_eq!(grants.plan("ns", None, "2.50").0.budget, MeterBudget::Grants(c.grant_url.clone()));
        assert_eq!("grants".parse(), Ok(BudgetMode::Grants));
        assert!("shared".parse::<BudgetMode>().is_err());
    }
}
