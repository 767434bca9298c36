//! The meter in an agent Pod: a native sidecar (an init container with `restartPolicy: Always`,
//! so it starts before the agent and outlives it to record the last call), listening on
//! loopback. The agent gets base URLs pointing at it and a dummy key; the real keys come from a
//! Secret mounted into the meter's container only.
//!
//! Configuration (`MeterSidecar`): the image (the operator's own), the Secret holding the keys
//! under `openai` and `anthropic` (named per namespace by the team, or cluster-wide by the admin
//! and copied into the namespace: a Pod can only mount Secrets of its own namespace), optional
//! upstream URLs (an internal gateway, Azure), and the budget the meter holds.

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, KeyToPath, Pod, ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

pub const CONTAINER: &str = "agentgate-meter";
pub const PORT: u16 = 4000;
const KEYS_VOLUME: &str = "agentgate-meter-keys";
const KEYS_DIR: &str = "/var/run/agentgate/meter-keys";
/// What SDKs find in the agent's environment instead of a key: they insist on one being set.
pub const DUMMY_KEY: &str = "agentgate-metered";
/// Names under which SDKs and agents look for keys and endpoints; the meter sets them all.
const KEY_VARS: [&str; 4] = ["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AGENTGATE_OPENAI_API_KEY", "AGENTGATE_ANTHROPIC_API_KEY"];

#[derive(Clone, Debug, PartialEq)]
pub struct MeterSidecar {
    pub image: String,
    /// Secret (in the Pod's namespace) with keys `openai` and/or `anthropic`.
    pub keys_secret: String,
    pub openai_key: bool,
    pub anthropic_key: bool,
    pub openai_upstream: Option<String>,
    pub anthropic_upstream: Option<String>,
    pub budget_usd: String,
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.to_string(), value: Some(value.to_string()), value_from: None }
}

fn restricted() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        run_as_non_root: Some(true),
        // The distroless image's nonroot user, set explicitly: runAsNonRoot needs a numeric user.
        run_as_user: Some(65532),
        run_as_group: Some(65532),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
        ..SecurityContext::default()
    }
}

/// Adds the meter to an agent Pod built by `pod_builder::build_pod`.
pub fn inject(pod: &mut Pod, meter: &MeterSidecar) {
    let Some(spec) = pod.spec.as_mut() else { return };
    let mut args =
        vec!["meter".to_string(), "--listen".into(), format!("127.0.0.1:{PORT}"), "--budget-usd".into(), meter.budget_usd.clone()];
    let mut items = Vec::new();
    for (wanted, provider) in [(meter.openai_key, "openai"), (meter.anthropic_key, "anthropic")] {
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
    let small = |cpu: &str, memory: &str| {
        Some(std::collections::BTreeMap::from([("cpu".to_string(), Quantity(cpu.into())), ("memory".to_string(), Quantity(memory.into()))]))
    };
    spec.init_containers.get_or_insert_with(Vec::new).push(Container {
        name: CONTAINER.into(),
        image: Some(meter.image.clone()),
        args: Some(args),
        // Native sidecar: started before the agent, stopped after it.
        restart_policy: Some("Always".into()),
        // Idle RSS is under 16 MiB; the limit leaves room for large bodies in flight.
        resources: Some(ResourceRequirements { requests: small("20m", "32Mi"), limits: small("500m", "128Mi"), ..Default::default() }),
        volume_mounts: Some(vec![VolumeMount {
            name: KEYS_VOLUME.into(),
            mount_path: KEYS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        security_context: Some(restricted()),
        ..Container::default()
    });
    // World-readable files, yet only the meter's container mounts them: other containers of the
    // Pod have their own mount namespace and cannot see them.
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: KEYS_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(meter.keys_secret.clone()),
            items: Some(items),
            default_mode: Some(0o444),
            optional: Some(false),
            ..Default::default()
        }),
        ..Volume::default()
    });
    let openai = format!("http://127.0.0.1:{PORT}/v1");
    let anthropic = format!("http://127.0.0.1:{PORT}");
    let ours = [
        ("OPENAI_BASE_URL", openai.as_str()),
        ("AGENTGATE_OPENAI_BASE_URL", openai.as_str()),
        ("ANTHROPIC_BASE_URL", anthropic.as_str()),
        ("AGENTGATE_ANTHROPIC_BASE_URL", anthropic.as_str()),
    ];
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
    }
    // The agent container mounts no volume of the keys' Secret (the meter's is its own).
    let key_volumes: Vec<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| v.name != KEYS_VOLUME && v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(meter.keys_secret.as_str()))
        .map(|v| v.name.clone())
        .collect();
    for agent in &mut spec.containers {
        if let Some(mounts) = agent.volume_mounts.as_mut() {
            mounts.retain(|m| m.name != KEYS_VOLUME && !key_volumes.contains(&m.name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Agent;
    use crate::domain::pod_builder::{PodPlan, build_pod};
    use k8s_openapi::api::core::v1::{EnvFromSource, EnvVarSource, SecretEnvSource, SecretKeySelector};

    fn meter() -> MeterSidecar {
        MeterSidecar {
            image: "ghcr.io/agentgate/agentgate:1".into(),
            keys_secret: "llm-keys".into(),
            openai_key: true,
            anthropic_key: true,
            openai_upstream: None,
            anthropic_upstream: Some("https://gateway.internal".into()),
            budget_usd: "5.00".into(),
        }
    }

    fn pod() -> Pod {
        let agent: Agent = serde_json::from_value(serde_json::json!({
            "name": "coder", "image": "agent:1", "model": "gpt-4o",
            "env": [{"name": "GITHUB_TOKEN", "valueFrom": {"secretKeyRef": {"name": "gh", "key": "token"}}}]
        }))
        .unwrap();
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
        };
        build_pod(&plan)
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
        assert!(args.starts_with("meter --listen 127.0.0.1:4000 --budget-usd 5.00"), "{args}");
        assert!(args.contains("--openai-key-file /var/run/agentgate/meter-keys/openai"));
        assert!(args.contains("--anthropic-upstream https://gateway.internal"));
        assert_eq!(sidecar.volume_mounts.as_ref().unwrap()[0].mount_path, KEYS_DIR);
        let agent = &spec.containers[0];
        assert_eq!(env_of(agent, "OPENAI_BASE_URL"), Some("http://127.0.0.1:4000/v1"));
        assert_eq!(env_of(agent, "ANTHROPIC_BASE_URL"), Some("http://127.0.0.1:4000"));
        assert_eq!(env_of(agent, "AGENTGATE_OPENAI_BASE_URL"), Some("http://127.0.0.1:4000/v1"));
        assert_eq!(env_of(agent, "OPENAI_API_KEY"), Some(DUMMY_KEY));
        assert_eq!(env_of(agent, "ANTHROPIC_API_KEY"), Some(DUMMY_KEY));
        assert!(agent.env.iter().flatten().any(|e| e.name == "GITHUB_TOKEN"), "the agent's other secrets stay");
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
        spec.volumes = Some(vec![Volume {
            name: "k".into(),
            secret: Some(SecretVolumeSource { secret_name: Some("llm-keys".into()), ..Default::default() }),
            ..Default::default()
        }]);
        agent.volume_mounts = Some(vec![
            VolumeMount { name: "k".into(), mount_path: "/keys".into(), ..Default::default() },
            VolumeMount { name: KEYS_VOLUME.into(), mount_path: "/stolen".into(), ..Default::default() },
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
        // Restricted allows these volume types only; the meter adds a Secret.
        for v in spec.volumes.iter().flatten() {
            assert!(v.secret.is_some() || v.config_map.is_some() || v.empty_dir.is_some() || v.projected.is_some(), "{}", v.name);
        }
        assert!(spec.host_network.is_none() && spec.host_pid.is_none());
    }
}
