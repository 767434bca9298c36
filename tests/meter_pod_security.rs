//! The meter in the agent Pods the operator creates, against the real apiserver: with the
//! sidecar injected (keys Secret volume, projected token) a Pod still passes the restricted Pod
//! Security Standard as PodSecurity admission enforces it (server-side dry run); the operator
//! injects it into every agent Pod, mounts the keys into the meter only, and strips a job's
//! attempt to hand them to the agent.

mod support;

use std::time::Duration;

use agentgate::api::{Agent, AgentJob, Decision};
use agentgate::domain::meter_sidecar::{self as sidecar, BudgetMode, MeterConfig, NamespaceKeys};
use agentgate::domain::pod_builder::{PodPlan, build_pod};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use support::cluster::{Env, OperatorMode, agent_job, job_pods, phase, vote, wait_for, wait_for_job};

const NS: &str = "meter-pss";

fn metered_pod() -> Pod {
    let agent: Agent = serde_json::from_value(json!({"name": "coder", "image": "ghcr.io/acme/agent:1", "model": "gpt-4o-mini"})).unwrap();
    let config = MeterConfig {
        image: "ghcr.io/agentgate/agentgate:1".into(),
        keys_secret: "llm-keys".into(),
        openai_upstream: None,
        anthropic_upstream: None,
        budget_mode: BudgetMode::Grants,
        grant_url: "https://agentgate-meter-api.agentgate-system.svc:8444".into(),
    };
    let (mut meter, _) = config.plan(NS, Some(&NamespaceKeys { openai: true, anthropic: true, ..NamespaceKeys::default() }), "5.00");
    // The CA (set by the operator at Pod creation) and the startup probe are part of what
    // restricted admission sees.
    meter.grant_ca_pem = Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into());
    let plan = PodPlan {
        job_name: "job",
        namespace: NS,
        job_uid: "00000000-0000-0000-0000-000000000001",
        job_generation: 1,
        agent: &agent,
        attempt: 1,
        cpu: "500m",
        memory: "512Mi",
        gpu: None,
        deadline_seconds: 600,
        budget_usd: "5.00",
        input_json: "{}",
        tool_urls: &[],
        meter: &meter,
    };
    let mut pod = build_pod(&plan);
    // A dry run admits no owner that does not exist: the owner is the operator's business.
    pod.metadata.owner_references = None;
    pod
}

#[tokio::test]
async fn a_pod_with_the_meter_sidecar_is_admitted_where_restricted_is_enforced() {
    let env = Env::builder(NS).pod_security_restricted().without_voting_rights().operator(OperatorMode::Later).build().await;
    let pods = Api::<Pod>::namespaced(env.admin.clone(), NS);
    let dry_run = PostParams { dry_run: true, ..PostParams::default() };

    let admitted = pods.create(&dry_run, &metered_pod()).await.expect("the metered Pod is admitted");
    let init = admitted.spec.unwrap().init_containers.unwrap();
    assert_eq!(init[0].name, sidecar::CONTAINER);
    assert_eq!(init[0].restart_policy.as_deref(), Some("Always"), "kept as a native sidecar");

    // The control: enforcement is live, and it reads the sidecar too.
    let mut careless = metered_pod();
    careless.spec.as_mut().unwrap().init_containers.as_mut().unwrap()[0].security_context = None;
    match pods.create(&dry_run, &careless).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{}", s.message);
            assert!(s.message.contains(sidecar::CONTAINER), "the refusal names the sidecar: {}", s.message);
        }
        other => panic!("a sidecar without a securityContext must be refused in {NS}, got {other:?}"),
    }
}

const KEYED: &str = "meter-keyed";
const KEYLESS: &str = "meter-keyless";

/// The operator injects the meter into the agent Pods it creates: where the namespace holds the
/// keys Secret, only the meter mounts it, with the namespace's upstream; where it does not, the
/// meter is keyless and the job gets a `MeterKeysMissing` Warning. The job's author tries to hand
/// the agent the keys through its spec (env secretKeyRef, under the SDK's name and another): the
/// Pod carries neither. The key's value is in no Pod, Event or job status.
#[tokio::test]
async fn the_operator_injects_the_meter_and_the_agent_gets_no_key() {
    let env = Env::builder(KEYED).namespaces(&[KEYLESS]).node("meter-node", "64", "256Gi", &[]).operator(OperatorMode::Later);
    let mut env = env.all_namespaces().args(&["--meter-budget-mode", "grants"]).build().await;
    let admin = env.admin.clone();
    let planted = format!("sk-planted-{}", std::process::id() as u64 * 7919 + 104_729);
    let secret: Secret = serde_json::from_value(json!({"metadata": {"name": sidecar::DEFAULT_KEYS_SECRET,
            "annotations": {sidecar::ANNOTATION_OPENAI_UPSTREAM: "http://llm-gateway.meter-keyed.svc:8080/v1"}},
        "stringData": {"openai": planted}}))
    .unwrap();
    Api::<Secret>::namespaced(admin.clone(), KEYED).create(&PostParams::default(), &secret).await.expect("keys Secret");
    env.start_operator();

    let mut pods = Vec::new();
    for ns in [KEYED, KEYLESS] {
        // The author may read the keys (so no admission policy stops the reference): the operator
        // still strips it.
        let job = agent_job(
            "chat",
            json!({"category": "payments", "agents": {"primary": {"name": "coder", "image": "ghcr.io/acme/agent:1", "model": "gpt-4o-mini",
                "env": [{"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": sidecar::DEFAULT_KEYS_SECRET, "key": "openai"}}},
                        {"name": "STOLEN", "valueFrom": {"secretKeyRef": {"name": sidecar::DEFAULT_KEYS_SECRET, "key": "openai"}}},
                        {"name": "OPENAI_BASE_URL", "value": "https://api.openai.com/v1"}]}},
                   "resources": {"cpu": "500m", "memory": "512Mi"}, "budget": {"maxCostUSD": "5.00"}}),
            json!({}),
        );
        let job = Api::<AgentJob>::namespaced(admin.clone(), ns).create(&PostParams::default(), &job).await.expect("create job");
        vote(&env.alice, &job, "alice", Decision::Approve).await;
        vote(&env.bob, &job, "bob", Decision::Approve).await;
        let running = wait_for_job(&admin, ns, "chat", "Running", |j| phase(j) == Some("Running")).await;
        let pod = wait_for("the agent Pod", Duration::from_secs(30), || job_pods(&admin, ns, &running), |p: &Vec<Pod>| p.len() == 1).await;
        pods.push((ns, pod[0].clone()));
    }

    for (ns, pod) in &pods {
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false), "{ns}");
        let meter = &spec.init_containers.as_ref().expect("a sidecar")[0];
        assert_eq!((meter.name.as_str(), meter.restart_policy.as_deref()), (sidecar::CONTAINER, Some("Always")), "{ns}");
        let args = meter.args.as_ref().unwrap().join(" ");
        assert!(
            args.contains("--grant-url https://agentgate-meter-api.default.svc:8444") && !args.contains("--budget-usd"),
            "{ns}: {args}"
        );
        assert!(!args.contains("--grant-insecure-http"), "{ns}: {args}");
        // The meter trusts the operator's CA (managed by default, in the operator's namespace).
        let ca = meter.env.iter().flatten().find(|e| e.name == sidecar::GRANT_CA_ENV).and_then(|e| e.value.clone());
        assert!(ca.is_some_and(|ca| ca.starts_with("-----BEGIN CERTIFICATE-----")), "{ns}: {:?}", meter.env);
        assert!(meter.startup_probe.as_ref().and_then(|p| p.exec.as_ref()).is_some(), "{ns}: the agent waits for its meter");
        let agent = serde_json::to_value(&spec.containers[0]).unwrap();
        let text = agent.to_string();
        assert!(!text.contains(sidecar::DEFAULT_KEYS_SECRET), "{ns}: the agent container references the keys: {text}");
        assert!(agent["volumeMounts"].is_null(), "{ns}: the agent container mounts {}", agent["volumeMounts"]);
        assert!(agent["envFrom"].is_null(), "{ns}");
        let env = |name: &str| agent["env"].as_array().unwrap().iter().filter(|e| e["name"] == name).cloned().collect::<Vec<_>>();
        assert_eq!(env("OPENAI_API_KEY"), [json!({"name": "OPENAI_API_KEY", "value": sidecar::DUMMY_KEY})], "{ns}");
        assert_eq!(env("OPENAI_BASE_URL"), [json!({"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:4000/v1"})], "{ns}");
        assert_eq!(env("STOLEN"), Vec::<serde_json::Value>::new(), "{ns}");
        // The meter's token: its own audience, in the meter only.
        let token = spec.volumes.iter().flatten().find(|v| v.name == sidecar::TOKEN_VOLUME).expect("token volume");
        let projection = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0].service_account_token.clone().unwrap();
        assert_eq!(projection.audience.as_deref(), Some(sidecar::TOKEN_AUDIENCE));
        assert!(meter.volume_mounts.iter().flatten().any(|m| m.name == sidecar::TOKEN_VOLUME && m.mount_path == sidecar::TOKEN_DIR));
    }
    let (_, keyed) = &pods[0];
    let meter = &keyed.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
    let args = meter.args.as_ref().unwrap().join(" ");
    assert!(args.contains("--openai-key-file /var/run/agentgate/meter-keys/openai"), "{args}");
    assert!(args.contains("--openai-upstream http://llm-gateway.meter-keyed.svc:8080/v1"), "the namespace's upstream: {args}");
    assert!(!args.contains("anthropic-key-file"), "the Secret has no anthropic key: {args}");
    assert!(meter.volume_mounts.iter().flatten().any(|m| m.name == sidecar::KEYS_VOLUME), "the meter mounts the keys");
    let (_, keyless) = &pods[1];
    assert!(keyless.spec.as_ref().unwrap().volumes.iter().flatten().all(|v| v.secret.is_none()), "no Secret volume that cannot mount");

    // Said where the team looks: a Warning on the keyless job, naming the Secret it needs.
    let events: Api<Event> = Api::namespaced(admin.clone(), KEYLESS);
    let warned = wait_for(
        "a MeterKeysMissing Event",
        Duration::from_secs(30),
        || async { events.list(&Default::default()).await.expect("events").items },
        |items: &Vec<Event>| items.iter().any(|e| e.reason.as_deref() == Some("MeterKeysMissing")),
    )
    .await;
    let note = warned.iter().find(|e| e.reason.as_deref() == Some("MeterKeysMissing")).unwrap().note.clone().unwrap_or_default();
    assert!(note.contains("Secret meter-keyless/agentgate-llm-keys does not exist"), "{note}");
    let keyed_events = Api::<Event>::namespaced(admin.clone(), KEYED).list(&Default::default()).await.unwrap().items;
    assert!(keyed_events.iter().all(|e| e.reason.as_deref() != Some("MeterKeysMissing")), "{keyed_events:?}");

    // The key itself is nowhere but in its Secret.
    for ns in [KEYED, KEYLESS] {
        let everything = [
            serde_json::to_string(&Api::<Pod>::namespaced(admin.clone(), ns).list(&Default::default()).await.unwrap().items).unwrap(),
            serde_json::to_string(&Api::<Event>::namespaced(admin.clone(), ns).list(&Default::default()).await.unwrap().items).unwrap(),
            serde_json::to_string(&Api::<AgentJob>::namespaced(admin.clone(), ns).list(&Default::default()).await.unwrap().items).unwrap(),
        ];
        assert!(everything.iter().all(|t| !t.contains(&planted)), "{ns}: the key's value leaked");
    }
}

const ROTATED: &str = "meter-rotated";

/// The operator remembers a namespace's keys Secret between attempt starts (meter_keys.rs) and
/// forgets it when the Secret changes. A team that moves its key to another provider and drops
/// the upstream annotation (say the gateway it named is no longer theirs) must see the next job's
/// meter follow: a stale answer would mount a key the Secret no longer holds and send calls to
/// the old upstream.
#[tokio::test]
async fn a_changed_keys_secret_reaches_the_next_jobs_meter() {
    let env = Env::builder(ROTATED).node("meter-rotated-node", "64", "256Gi", &[]).operator(OperatorMode::Later).build().await;
    let mut env = env;
    let admin = env.admin.clone();
    let secrets = Api::<Secret>::namespaced(admin.clone(), ROTATED);
    let keys = |annotations: serde_json::Value, data: serde_json::Value| -> Secret {
        serde_json::from_value(json!({"metadata": {"name": sidecar::DEFAULT_KEYS_SECRET, "annotations": annotations}, "stringData": data}))
            .unwrap()
    };
    let old_gateway = "http://old-gateway.meter-rotated.svc:8080/v1";
    secrets
        .create(&PostParams::default(), &keys(json!({sidecar::ANNOTATION_OPENAI_UPSTREAM: old_gateway}), json!({"openai": "sk-old"})))
        .await
        .expect("keys Secret");
    env.start_operator();

    let meter_args = |name: &'static str| {
        let admin = admin.clone();
        let (alice, bob) = (env.alice.clone(), env.bob.clone());
        async move {
            let job = agent_job(
                name,
                json!({"category": "payments", "agents": {"primary": {"name": "coder", "image": "ghcr.io/acme/agent:1", "model": "gpt-4o-mini"}},
                       "resources": {"cpu": "500m", "memory": "512Mi"}, "budget": {"maxCostUSD": "5.00"}}),
                json!({}),
            );
            let job = Api::<AgentJob>::namespaced(admin.clone(), ROTATED).create(&PostParams::default(), &job).await.expect("create job");
            vote(&alice, &job, "alice", Decision::Approve).await;
            vote(&bob, &job, "bob", Decision::Approve).await;
            let running = wait_for_job(&admin, ROTATED, name, "Running", |j| phase(j) == Some("Running")).await;
            let pods =
                wait_for("the agent Pod", Duration::from_secs(30), || job_pods(&admin, ROTATED, &running), |p: &Vec<Pod>| p.len() == 1)
                    .await;
            let meter = pods[0].spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0].clone();
            meter.args.unwrap_or_default().join(" ")
        }
    };
    let first = meter_args("first").await;
    assert!(first.contains("--openai-key-file") && first.contains(old_gateway), "{first}");

    // The team moves to Anthropic and drops the old gateway; the update is acknowledged before
    // the next job exists, and that job waits for two votes, so the operator's watch has seen it.
    let mut moved = keys(json!({}), json!({"anthropic": "sk-ant-new"}));
    moved.data = None;
    let mut current = secrets.get(sidecar::DEFAULT_KEYS_SECRET).await.unwrap();
    current.metadata.annotations = None;
    current.data = None;
    current.string_data = moved.string_data.clone();
    secrets.replace(sidecar::DEFAULT_KEYS_SECRET, &PostParams::default(), &current).await.expect("update the keys Secret");
    let second = meter_args("second").await;
    assert!(second.contains("--anthropic-key-file"), "the new key is mounted: {second}");
    assert!(!second.contains("--openai-key-file"), "the dropped key is not: {second}");
    assert!(!second.contains(old_gateway), "the dropped upstream is not used: {second}");
}
