//! The AgentJob lifecycle against a real apiserver, with the test playing the kubelet:
//! estimate → approval → Pods with limits → usage written back, and every way off that path.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use agentgate::api::{AgentJob, AgentTool, Decision};
use agentgate::domain::pricing::{PriceTable, TokenCounts};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::cluster::*;

async fn setup(ns: &str) -> Env {
    Env::builder(ns).node("lifecycle-node", "64", "256Gi", &[("nvidia.com/gpu", "8")]).build().await
}

fn job_manifest(name: &str, spec_patch: Value) -> AgentJob {
    JobManifest::new(name).job_type("security_vulnerability_scan").spec(spec_patch).build()
}

/// A Pod no job owns, valid under restricted Pod Security; it never runs (no node is real).
fn watch_barrier_pod() -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "watch-barrier"},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.37",
            "securityContext": {"allowPrivilegeEscalation": false, "runAsNonRoot": true, "runAsUser": 65532,
                "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}}]},
    }))
    .unwrap()
}

async fn create_job(env: &Env, job: &AgentJob) -> AgentJob {
    Api::<AgentJob>::namespaced(env.admin.clone(), &env.ns).create(&PostParams::default(), job).await.expect("create job")
}

async fn create_url_tool(client: &Client, name: &str, rate_limit: i32) {
    let tool: AgentTool = serde_json::from_value(json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentTool", "metadata": {"name": name},
        "spec": {"type": "api", "endpoint": {"url": format!("https://{name}.tools.example/v1")}, "rateLimit": rate_limit}}))
    .unwrap();
    Api::<AgentTool>::all(client.clone()).create(&PostParams::default(), &tool).await.expect("create tool");
}

async fn approve(env: &Env, job: &AgentJob) {
    vote(&env.alice, job, "alice", Decision::Approve).await;
    vote(&env.bob, job, "bob", Decision::Approve).await;
}

async fn wait_phase(env: &Env, name: &str, phase_name: &'static str) -> AgentJob {
    wait_for_job(&env.admin, &env.ns, name, phase_name, |j| phase(j) == Some(phase_name)).await
}

async fn wait_pods(env: &Env, job: &AgentJob, n: usize) -> Vec<Pod> {
    let client = env.admin.clone();
    wait_for(&format!("{n} pods"), Duration::from_secs(30), || job_pods(&client, &env.ns, job), |p: &Vec<Pod>| p.len() == n).await
}

#[tokio::test]
async fn happy_path_estimates_waits_for_two_votes_runs_limited_pods_and_records_usage() {
    let env = setup("lc-happy").await;
    create_url_tool(&env.admin, "lc-happy-bandit", 60).await;
    let job = create_job(
        &env,
        &job_manifest(
            "scan",
            json!({
                "agents": {"supporting": [{"name": "fixer", "image": "ghcr.io/acme/fixer:1.4", "model": "claude-sonnet-4"}]},
                "tools": [{"name": "lc-happy-bandit", "required": true, "minRateLimit": 10, "estimatedCalls": 5}],
                "resources": {"cpu": "2", "memory": "4Gi", "gpu": 1},
                "limits": {"maxExecutionSeconds": 600},
                "input": {"repositoryPath": "/src"},
            }),
        ),
    )
    .await;

    let waiting = wait_for_job(&env.admin, &env.ns, "scan", "AwaitingApproval with all checks passed", |j| {
        phase(j) == Some("AwaitingApproval") && j.status.as_ref().is_some_and(|s| !s.checks.is_empty() && s.checks.iter().all(|c| c.passed))
    })
    .await;
    let status = waiting.status.clone().unwrap();
    let estimate = status.estimate.clone().expect("estimate written");
    assert_eq!(estimate.method, "prior");
    assert_eq!(estimate.models.len(), 2);
    assert!(estimate.tokens.p90 > estimate.tokens.p50 && estimate.tokens.p50 > 0);
    assert_eq!(status.approval.as_ref().unwrap().summary, "0/2");
    assert_eq!(condition(&waiting, "Ready").unwrap().reason, "AwaitingApproval");
    assert_eq!(condition(&waiting, "Estimated").unwrap().status, "True");
    assert!(status.checks.iter().all(|c| c.passed), "{:?}", status.checks);
    assert!(job_pods(&env.admin, &env.ns, &job).await.is_empty(), "no Pod before approval");

    vote(&env.alice, &job, "alice", Decision::Approve).await;
    let one = wait_for_job(&env.admin, &env.ns, "scan", "1/2", |j| {
        j.status.as_ref().and_then(|s| s.approval.as_ref()).is_some_and(|a| a.summary == "1/2")
    })
    .await;
    assert_eq!(phase(&one), Some("AwaitingApproval"));
    vote(&env.bob, &job, "bob", Decision::Approve).await;
    let running = wait_phase(&env, "scan", "Running").await;
    assert_eq!(running.status.as_ref().unwrap().attempts.len(), 1);

    let pods = wait_pods(&env, &job, 2).await;
    assert_eq!(pods.iter().map(|p| p.name_any()).collect::<Vec<_>>(), vec!["scan-fixer-1-agentgate", "scan-scanner-1-agentgate"]);
    for pod in &pods {
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.active_deadline_seconds, Some(600));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let c = &spec.containers[0];
        let res = c.resources.as_ref().unwrap();
        for list in [res.requests.as_ref().unwrap(), res.limits.as_ref().unwrap()] {
            assert_eq!(list["cpu"].0, "2");
            assert_eq!(list["memory"].0, "4Gi");
            assert_eq!(list["nvidia.com/gpu"].0, "1");
        }
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(), &vec!["ALL".to_string()]);
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        assert_eq!(c.termination_message_policy.as_deref(), Some("FallbackToLogsOnError"));
        let env_vars: Vec<(String, String)> =
            c.env.as_ref().unwrap().iter().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect();
        for (k, v) in [
            ("AGENTGATE_JOB", "scan"),
            ("AGENTGATE_ATTEMPT", "1"),
            ("AGENTGATE_BUDGET_USD", "5.00"),
            ("AGENTGATE_INPUT", r#"{"repositoryPath":"/src"}"#),
            ("AGENTGATE_TOOL_LC_HAPPY_BANDIT_URL", "https://lc-happy-bandit.tools.example/v1"),
        ] {
            assert!(env_vars.contains(&(k.to_string(), v.to_string())), "{k}={v} missing from {env_vars:?}");
        }
        let owner = &pod.owner_references()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("AgentJob", Some(true)));
    }

    run_pod(&env.admin, &env.ns, "scan-scanner-1-agentgate").await;
    finish_pod(
        &env.admin,
        &env.ns,
        "scan-scanner-1-agentgate",
        0,
        &usage_report("gpt-4o-mini", 40_000, 10_000, 6_000, json!({"findings": 3})),
    )
    .await;
    // The Claude agent also wrote its prompt cache: counted apart and priced above input (the
    // apiserver keeps the fields: the CRD has them).
    let claude = json!({"usage": [{"model": "claude-sonnet-4", "inputTokens": 20_000, "cachedInputTokens": 0, "outputTokens": 4_000,
        "cacheWriteInputTokens": 8_000, "cacheWrite1hInputTokens": 2_000}], "output": {}});
    finish_pod(&env.admin, &env.ns, "scan-fixer-1-agentgate", 0, &claude.to_string()).await;

    let done = wait_phase(&env, "scan", "Succeeded").await;
    let status = done.status.unwrap();
    let usage = status.usage.unwrap();
    assert_eq!(usage.input_tokens, 60_000);
    assert_eq!(usage.cached_input_tokens, 10_000);
    assert_eq!(usage.output_tokens, 10_000);
    assert_eq!((usage.cache_write_input_tokens, usage.cache_write_1h_input_tokens), (8_000, 2_000));
    assert_eq!(usage.total_tokens, 90_000);
    let prices = PriceTable::builtin();
    let expected = prices
        .get("gpt-4o-mini")
        .unwrap()
        .cost(&TokenCounts { input: 40_000, cached_input: 10_000, output: 6_000, ..Default::default() })
        .saturating_add(prices.get("claude-sonnet-4").unwrap().cost(&TokenCounts {
            input: 20_000,
            cached_input: 0,
            output: 4_000,
            cache_write: 8_000,
            cache_write_1h: 2_000,
        }));
    assert_eq!(usage.cost_usd, expected.to_string());
    // The writes cost $0.042 at $3.75 and $6 per million; priced as input they were $0.03.
    let writes = usage.models.iter().find(|m| m.model == "claude-sonnet-4").unwrap();
    assert_eq!((writes.cache_write_input_tokens, writes.cache_write_1h_input_tokens, writes.cost_usd.as_str()), (8_000, 2_000, "0.162"));
    let want_error = ((90_000 - estimate.tokens.p50) as f64 / estimate.tokens.p50 as f64 * 100.0).round() as i64;
    assert_eq!(usage.estimate_error_percent, Some(want_error));
    assert_eq!(status.output.as_deref(), Some(&json!({"findings": 3})));
    assert_eq!(status.attempts[0].result, agentgate::api::AttemptResult::Succeeded);
    assert!(status.completion_time.is_some());
    let done = done_job(&env, "scan").await;
    assert_eq!(condition(&done, "Ready").unwrap().status, "True");
    // Status is written whole (PUT on /status): the metadata admission stamped is left alone, and
    // the status fields have one manager, the operator.
    assert_eq!(done.annotations().get("agentgate.dev/requested-by").map(String::as_str), Some("admin"));
    let status_managers: Vec<_> = done
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .map(|m| m.manager.clone().unwrap_or_default())
        .collect();
    assert_eq!(status_managers, ["agentgate"]);
}

async fn done_job(env: &Env, name: &str) -> AgentJob {
    Api::<AgentJob>::namespaced(env.admin.clone(), &env.ns).get(name).await.unwrap()
}

#[tokio::test]
async fn estimate_over_budget_is_rejected_with_both_figures() {
    let env = setup("lc-budget").await;
    create_job(
        &env,
        &job_manifest(
            "pricey",
            json!({
                "agents": {"primary": {"model": "claude-opus-4"}},
                "tools": [],
                "budget": {"maxCostUSD": "0.01"},
            }),
        ),
    )
    .await;
    let job = wait_phase(&env, "pricey", "Rejected").await;
    let ready = condition(&job, "Ready").unwrap();
    assert_eq!(ready.reason, "BudgetExceeded");
    assert!(ready.message.contains("exceeds budget.maxCostUSD $0.01"), "{}", ready.message);
    assert!(
        ready.message.contains(&format!("${}", job.status.as_ref().unwrap().estimate.as_ref().unwrap().cost_usd.p90)),
        "{}",
        ready.message
    );
    assert_eq!(condition(&job, "Stalled").unwrap().status, "True");

    // Raising the budget is a new generation: the job is evaluated again.
    Api::<AgentJob>::namespaced(env.admin.clone(), &env.ns)
        .patch("pricey", &PatchParams::default(), &Patch::Merge(json!({"spec": {"budget": {"maxCostUSD": "50"}}})))
        .await
        .unwrap();
    let job = wait_phase(&env, "pricey", "AwaitingApproval").await;
    assert!(condition(&job, "Stalled").is_none());
}

#[tokio::test]
async fn input_not_matching_its_schema_is_rejected_listing_paths() {
    let env = setup("lc-input").await;
    create_job(
        &env,
        &job_manifest(
            "bad-input",
            json!({
                "input": {"repositoryPath": "src", "scanDepth": "deep"},
                "inputSchema": {"type": "object", "required": ["repositoryPath"], "properties": {
                    "repositoryPath": {"type": "string", "pattern": "^/"}, "scanDepth": {"enum": ["quick", "full"]}}},
            }),
        ),
    )
    .await;
    let job = wait_phase(&env, "bad-input", "Rejected").await;
    let ready = condition(&job, "Ready").unwrap();
    assert_eq!(ready.reason, "InvalidInput");
    assert!(ready.message.contains("input/repositoryPath") && ready.message.contains("input/scanDepth"), "{}", ready.message);
}

/// An input's keys and values are the tenant's, and the schema errors quoting them reach every
/// reader of the job's status and Events (a head's `kubectl describe`, `kubectl get events -w`):
/// raw, an escape sequence cleared their lines and a line break started a fake one.
#[tokio::test]
async fn schema_errors_quoting_a_tenants_input_are_one_inert_line_in_status_and_events() {
    let env = setup("lc-input-escapes").await;
    let hostile_key = "repo\x1b[2K\x1b[1A\r\u{202E}\nApproved=True (Approved): approved by alice, bob";
    create_job(
        &env,
        &job_manifest(
            "escapes",
            json!({
                "input": {hostile_key: 1, "depth": "\u{9b}2K\u{200B}deep"},
                "inputSchema": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 1}},
            }),
        ),
    )
    .await;
    let hidden = |text: &str| -> Vec<String> {
        text.chars().filter(|c| agentgate::domain::terminal_text::is_hidden(*c)).map(|c| format!("U+{:04X}", c as u32)).collect()
    };
    let job = wait_phase(&env, "escapes", "Rejected").await;
    let ready = condition(&job, "Ready").unwrap();
    assert_eq!(ready.reason, "InvalidInput");
    assert_eq!(hidden(&ready.message), Vec::<String>::new(), "{:?}", ready.message);
    assert!(ready.message.contains(r"repo\u001B[2K\u001B[1A\r\u202E\nApproved=True"), "{}", ready.message);
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.admin.clone(), &env.ns);
    let notes = wait_for(
        "an Event naming the input error",
        Duration::from_secs(30),
        || async {
            let all = events.list(&Default::default()).await.expect("list events").items;
            all.into_iter().filter_map(|e| e.note).collect::<Vec<String>>()
        },
        |notes: &Vec<String>| notes.iter().any(|n| n.contains("input/repo")),
    )
    .await;
    for note in &notes {
        assert_eq!(hidden(note), Vec::<String>::new(), "{note:?}");
    }
}

/// A job's input, schemas and agent command lines over 1 KiB stay out of the operator's cache
/// (controller::slim::job): the checks, the spec history and the Pod still get them whole. A
/// tenant who marks a small job as if its input had been left out changes nothing: the mark is
/// not cached.
#[tokio::test]
async fn a_big_input_left_out_of_the_cache_is_still_checked_recorded_and_handed_to_the_pod() {
    let env = setup("lc-big-input").await;
    let paths: Vec<String> = (0..60).map(|i| format!("/src/module-{i:03}/deeply/nested/path")).collect();
    let schema = json!({"type": "object", "required": ["repositoryPath", "paths"], "properties": {
        "repositoryPath": {"type": "string", "pattern": "^/"}, "paths": {"type": "array", "items": {"type": "string"}}}});
    let input = json!({"repositoryPath": "/src", "paths": paths});
    assert!(input.to_string().len() > 2048, "bigger than the cache keeps");
    create_job(&env, &job_manifest("bad-big", json!({"input": {"repositoryPath": "src", "paths": paths}, "inputSchema": schema}))).await;
    let rejected = wait_phase(&env, "bad-big", "Rejected").await;
    let ready = condition(&rejected, "Ready").unwrap();
    assert!(ready.reason == "InvalidInput" && ready.message.contains("input/repositoryPath"), "{ready:?}");

    let args: Vec<String> = (0..8).map(|i| format!("--path-{i}={}", paths.join(","))).collect();
    let job =
        create_job(&env, &job_manifest("big", json!({"input": input, "inputSchema": schema, "agents": {"primary": {"args": args}}}))).await;
    let mut marked = job_manifest("marked", json!({"input": {"repositoryPath": "/small"}}));
    marked.metadata.annotations = Some([("agentgate.dev/cached-without-input".to_string(), String::new())].into());
    let marked = create_job(&env, &marked).await;
    for j in [&job, &marked] {
        wait_phase(&env, &j.name_any(), "AwaitingApproval").await;
        approve(&env, j).await;
    }
    let running = wait_phase(&env, "big", "Running").await;
    let stored = Api::<AgentJob>::namespaced(env.admin.clone(), &env.ns).get("big").await.unwrap();
    let history = &running.status.as_ref().unwrap().history;
    assert_eq!(history[0].spec_digest, agentgate::domain::history::spec_digest(&stored.spec), "the digest is of the whole spec");
    for (j, want) in [(&job, input.to_string()), (&marked, json!({"repositoryPath": "/small"}).to_string())] {
        let pods = wait_pods(&env, j, 1).await;
        let env_vars = pods[0].spec.as_ref().unwrap().containers[0].env.clone().unwrap();
        let got = env_vars.iter().find(|e| e.name == "AGENTGATE_INPUT").and_then(|e| e.value.clone());
        assert_eq!(
            got.map(|g| serde_json::from_str::<Value>(&g).unwrap()),
            Some(serde_json::from_str::<Value>(&want).unwrap()),
            "{}",
            j.name_any()
        );
        if j.name_any() == "big" {
            assert_eq!(pods[0].spec.as_ref().unwrap().containers[0].args.as_ref(), Some(&args), "the command line, whole");
        }
    }
}

#[tokio::test]
async fn unknown_model_is_a_condition_not_a_zero_estimate() {
    let env = setup("lc-model").await;
    create_job(&env, &job_manifest("mystery", json!({"agents": {"primary": {"model": "my-private-llm"}}}))).await;
    let job = wait_for_job(&env.admin, &env.ns, "mystery", "UnknownModel", |j| {
        condition(j, "Estimated").is_some_and(|c| c.reason == "UnknownModel")
    })
    .await;
    assert_eq!(phase(&job), Some("Pending"));
    assert!(job.status.unwrap().estimate.is_none());
}

#[tokio::test]
async fn job_waits_for_a_missing_required_tool_and_proceeds_once_registered() {
    let env = setup("lc-tool").await;
    let job = create_job(
        &env,
        &job_manifest(
            "needs-tool",
            json!({
                "tools": [{"name": "lc-tool-late", "required": true, "minRateLimit": 5, "estimatedCalls": 1},
                          {"name": "lc-tool-never", "required": false, "estimatedCalls": 1}],
            }),
        ),
    )
    .await;
    approve(&env, &job).await;
    let waiting = wait_phase(&env, "needs-tool", "WaitingForResources").await;
    let status = waiting.status.clone().unwrap();
    assert_eq!(status.missing_tools, vec!["lc-tool-late".to_string(), "lc-tool-never".to_string()]);
    assert_eq!(condition(&waiting, "Ready").unwrap().reason, "ToolsNotReady");
    assert!(
        status.checks.iter().any(|c| !c.passed && c.message.contains("required tool lc-tool-late has no AgentTool")),
        "{:?}",
        status.checks
    );

    create_url_tool(&env.admin, "lc-tool-late", 30).await;
    let running = wait_phase(&env, "needs-tool", "Running").await;
    let checks = running.status.unwrap().checks;
    assert!(checks.iter().any(|c| !c.passed && c.message.contains("optional tool lc-tool-never")), "optional tool only warns: {checks:?}");
}

#[tokio::test]
async fn job_waits_until_a_node_fits_and_runs_when_one_is_added() {
    let env = setup("lc-nodes").await;
    let job = create_job(
        &env,
        &job_manifest(
            "big",
            json!({
                "resources": {"cpu": "4", "memory": "8Gi", "gpu": 2, "gpuResourceName": "example.com/lc-nodes-gpu"},
            }),
        ),
    )
    .await;
    approve(&env, &job).await;
    let waiting = wait_phase(&env, "big", "WaitingForResources").await;
    assert_eq!(condition(&waiting, "Ready").unwrap().reason, "InsufficientResources");
    assert_eq!(waiting.status.unwrap().insufficient_resources, vec!["example.com/lc-nodes-gpu".to_string()]);

    add_node(&env.admin, "lc-nodes-gpu-node", "8", "32Gi", &[("example.com/lc-nodes-gpu", "2")]).await;
    wait_phase(&env, "big", "Running").await;
    let pods = wait_pods(&env, &job, 1).await;
    assert_eq!(
        pods[0].spec.as_ref().unwrap().containers[0].resources.as_ref().unwrap().limits.as_ref().unwrap()["example.com/lc-nodes-gpu"].0,
        "2"
    );
}

/// The meter sidecar's 100m / 64Mi count as the scheduler counts them: an agent of 63,950m fits
/// this binary's largest node (64 CPUs, nothing bound to it) alone, not with its meter. The job
/// waits, saying so, and runs once a node has room for both.
#[tokio::test]
async fn a_job_that_fits_a_node_only_without_its_meter_sidecar_waits_naming_the_sidecars_share() {
    let env = setup("lc-sidecar-node").await;
    let job = create_job(&env, &job_manifest("almost", json!({"resources": {"cpu": "63950m", "memory": "1Gi"}}))).await;
    approve(&env, &job).await;
    let waiting = wait_phase(&env, "almost", "WaitingForResources").await;
    let ready = condition(&waiting, "Ready").unwrap();
    assert_eq!(ready.reason, "InsufficientResources", "{ready:?}");
    assert!(
        ready.message.contains("cpu 64050m, memory 1088Mi, of which the agentgate-meter sidecar cpu 100m, memory 64Mi")
            && ready.message.contains("short of cpu"),
        "{ready:?}"
    );
    assert_eq!(waiting.status.unwrap().insufficient_resources, vec!["cpu".to_string()]);

    add_node(&env.admin, "lc-sidecar-node", "65", "256Gi", &[]).await;
    wait_phase(&env, "almost", "Running").await;
    let pods = wait_pods(&env, &job, 1).await;
    let spec = pods[0].spec.as_ref().unwrap();
    let meter = spec.init_containers.as_ref().unwrap().iter().find(|c| c.name == "agentgate-meter").expect("the meter sidecar");
    assert_eq!(meter.restart_policy.as_deref(), Some("Always"));
    assert_eq!(meter.resources.as_ref().unwrap().requests.as_ref().unwrap()["cpu"].0, "100m", "the share the check counted");
}

/// The same for a ResourceQuota: two agents of 450m fit `requests.cpu: 1` alone (900m), not
/// with their meters (1,100m).
#[tokio::test]
async fn a_job_that_fits_its_quota_only_without_its_meter_sidecars_waits_naming_their_share() {
    let env = setup("lc-sidecar-quota").await;
    let quota: k8s_openapi::api::core::v1::ResourceQuota = serde_json::from_value(json!({"apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": "team"}, "spec": {"hard": {"requests.cpu": "1"}}}))
    .unwrap();
    let quotas: Api<k8s_openapi::api::core::v1::ResourceQuota> = Api::namespaced(env.admin.clone(), &env.ns);
    quotas.create(&PostParams::default(), &quota).await.expect("create the quota");
    let two_agents = json!({"resources": {"cpu": "450m", "memory": "256Mi"},
        "agents": {"supporting": [{"name": "helper", "image": "ghcr.io/acme/scanner:2.1", "model": "gpt-4o-mini"}]}});
    let job = create_job(&env, &job_manifest("pair", two_agents)).await;
    approve(&env, &job).await;
    let waiting = wait_phase(&env, "pair", "WaitingForResources").await;
    let ready = condition(&waiting, "Ready").unwrap();
    assert_eq!(ready.reason, "QuotaExceeded", "{ready:?}");
    assert!(
        ready.message.contains("requests.cpu (used 0m, hard 1000m, job needs 1100m, 200m of it for the agentgate-meter sidecars)"),
        "{ready:?}"
    );
    assert_eq!(waiting.status.unwrap().insufficient_resources, vec!["quota/team".to_string()]);
}

/// The attack: another tenant's Pod that holds a node's GPUs in a native sidecar (an init
/// container with `restartPolicy: Always`) and requests next to nothing in its app container.
/// The scheduler counts the sidecar; so does the operator, which would otherwise see the GPUs
/// free and start a Pod that can never be scheduled.
#[tokio::test]
async fn a_foreign_pod_holding_a_node_in_a_sidecar_is_counted() {
    let env = setup("lc-hidden").await;
    let gpu = "example.com/lc-hidden-gpu";
    add_node(&env.admin, "lc-hidden-node", "8", "32Gi", &[(gpu, "2")]).await;
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), &env.ns);
    let hog: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sidecar-hog"},
        "spec": {"nodeName": "lc-hidden-node", "restartPolicy": "Never",
            "initContainers": [{"name": "holder", "image": "busybox:1.36", "restartPolicy": "Always",
                "resources": {"requests": {gpu: "2"}, "limits": {gpu: "2"}}}],
            "containers": [{"name": "c", "image": "busybox:1.36", "resources": {"requests": {"cpu": "1m"}}}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &hog).await.expect("create the foreign Pod");
    let job = create_job(
        &env,
        &job_manifest("behind-hog", json!({"resources": {"cpu": "1", "memory": "1Gi", "gpu": 1, "gpuResourceName": gpu}})),
    )
    .await;
    approve(&env, &job).await;
    let waiting = wait_phase(&env, "behind-hog", "WaitingForResources").await;
    assert_eq!(condition(&waiting, "Ready").unwrap().reason, "InsufficientResources");
    assert_eq!(waiting.status.unwrap().insufficient_resources, vec![gpu.to_string()]);
    assert!(job_pods(&env.admin, &env.ns, &job).await.is_empty(), "no Pod that could not be scheduled");

    // The foreign Pod ends: its sidecar's GPUs are free again, and the job runs.
    let failed = json!({"status": {"phase": "Failed", "reason": "Evicted"}});
    pods.patch_status("sidecar-hog", &PatchParams::default(), &Patch::Merge(&failed)).await.expect("the foreign Pod fails");
    wait_phase(&env, "behind-hog", "Running").await;
    wait_pods(&env, &job, 1).await;
}

/// A Pod that is none of the operator's frees the room a waiting job needs: that job is woken
/// by the Pod's own event (controller/wakeups.rs `capacity_released`), not by the 5-minute
/// resync (which jobs a release wakes, and which it leaves alone: controller/index_tests.rs).
#[tokio::test]
async fn a_foreign_pod_finishing_wakes_the_job_waiting_for_its_room() {
    let env = setup("lc-release").await;
    let gpu = "example.com/lc-release-gpu";
    add_node(&env.admin, "lc-release-node", "8", "32Gi", &[(gpu, "2")]).await;
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), &env.ns);
    let hog: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gpu-hog"},
        "spec": {"nodeName": "lc-release-node", "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox:1.36",
            "resources": {"requests": {gpu: "2"}, "limits": {gpu: "2"}}}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &hog).await.expect("create the foreign Pod");
    let job =
        create_job(&env, &job_manifest("after-hog", json!({"resources": {"cpu": "1", "memory": "1Gi", "gpu": 1, "gpuResourceName": gpu}})))
            .await;
    approve(&env, &job).await;
    let waiting = wait_phase(&env, "after-hog", "WaitingForResources").await;
    assert_eq!(waiting.status.unwrap().insufficient_resources, vec![gpu.to_string()]);

    let failed = json!({"status": {"phase": "Failed", "reason": "Evicted"}});
    pods.patch_status("gpu-hog", &PatchParams::default(), &Patch::Merge(&failed)).await.expect("the foreign Pod fails");
    let running = wait_phase(&env, "after-hog", "Running").await;
    let waited = k8s_openapi::jiff::Timestamp::now().duration_since(condition(&running, "Approved").unwrap().last_transition_time.0);
    assert!(waited.as_secs() < 60, "woken by the Pod's event, not the resync: {waited:?} after approval");
    wait_pods(&env, &job, 1).await;
}

#[tokio::test]
async fn optional_gpu_is_dropped_when_it_is_the_only_thing_missing() {
    let env = setup("lc-optional").await;
    let job = create_job(
        &env,
        &job_manifest(
            "flex",
            json!({
                "resources": {"cpu": "1", "memory": "1Gi", "gpu": 1, "gpuResourceName": "example.com/lc-optional-gpu", "optional": ["gpu"]},
            }),
        ),
    )
    .await;
    approve(&env, &job).await;
    let running = wait_phase(&env, "flex", "Running").await;
    assert_eq!(running.status.unwrap().dropped_resources, vec!["gpu".to_string()]);
    let pods = wait_pods(&env, &job, 1).await;
    let limits = pods[0].spec.as_ref().unwrap().containers[0].resources.as_ref().unwrap().limits.clone().unwrap();
    assert!(!limits.contains_key("example.com/lc-optional-gpu"), "{limits:?}");
}

#[tokio::test]
async fn one_reject_vote_rejects_the_job() {
    let env = setup("lc-reject").await;
    let job = create_job(&env, &job_manifest("risky", json!({}))).await;
    vote(&env.alice, &job, "alice", Decision::Approve).await;
    vote(&env.bob, &job, "bob", Decision::Reject).await;
    let rejected = wait_phase(&env, "risky", "Rejected").await;
    assert_eq!(condition(&rejected, "Ready").unwrap().reason, "VoteRejected");
    assert_eq!(rejected.status.unwrap().approval.unwrap().rejected_by.as_deref(), Some("bob"));
    assert!(job_pods(&env.admin, &env.ns, &job).await.is_empty());
}

#[tokio::test]
async fn votes_for_an_old_generation_are_ignored_and_duplicate_voters_count_once() {
    let env = setup("lc-votes").await;
    let job = create_job(&env, &job_manifest("changing", json!({}))).await;
    wait_phase(&env, "changing", "AwaitingApproval").await;
    vote(&env.alice, &job, "alice", Decision::Approve).await;
    vote(&env.alice, &job, "alice", Decision::Approve).await;
    let tallied = wait_for_job(&env.admin, &env.ns, "changing", "duplicate ignored", |j| {
        j.status.as_ref().and_then(|s| s.approval.as_ref()).is_some_and(|a| a.ignored_votes.len() == 1)
    })
    .await;
    let approval = tallied.status.unwrap().approval.unwrap();
    assert_eq!(approval.summary, "1/2");
    assert!(approval.ignored_votes[0].why.contains("alice already has a counted vote"), "{:?}", approval.ignored_votes);

    // A spec change voids every earlier vote.
    let api = Api::<AgentJob>::namespaced(env.admin.clone(), &env.ns);
    let changed = api
        .patch("changing", &PatchParams::default(), &Patch::Merge(json!({"spec": {"description": "now with more scope"}})))
        .await
        .unwrap();
    assert_eq!(changed.metadata.generation, Some(2));
    vote_on_generation(&env.bob, &job, "bob", Decision::Approve, 1).await;
    let after = wait_for_job(&env.admin, &env.ns, "changing", "old votes ignored", |j| {
        j.status.as_ref().and_then(|s| s.approval.as_ref()).is_some_and(|a| a.ignored_votes.len() == 3)
    })
    .await;
    let approval = after.status.unwrap().approval.unwrap();
    assert_eq!(approval.summary, "0/2");
    // Each voter's first ignored vote is listed; alice's second is counted in the `(more)` line.
    let (more, listed): (Vec<_>, Vec<_>) = approval.ignored_votes.iter().partition(|v| v.name == "(more)");
    assert!(listed.len() == 2 && listed.iter().all(|v| v.why.contains("is for generation 1 but the job is at generation 2")), "{listed:?}");
    assert!(more.len() == 1 && more[0].why.starts_with("1 more ignored vote"), "{more:?}");
    let votes = Api::<agentgate::api::ApprovalVote>::namespaced(env.admin.clone(), &env.ns);
    let bob = wait_for(
        "vote status",
        Duration::from_secs(10),
        || async { votes.list(&Default::default()).await.unwrap().items },
        |vs| vs.iter().all(|v| v.status.as_ref().is_some_and(|s| s.counted == Some(false))),
    )
    .await;
    assert_eq!(bob.len(), 3);

    vote(&env.alice, &changed, "alice", Decision::Approve).await;
    vote(&env.bob, &changed, "bob", Decision::Approve).await;
    wait_phase(&env, "changing", "Running").await;
}

#[tokio::test]
async fn failed_attempts_are_retried_up_to_max_retries_then_the_job_fails_keeping_all_usage() {
    let env = setup("lc-retry").await;
    let job = create_job(&env, &job_manifest("flaky", json!({"limits": {"maxRetries": 2}}))).await;
    approve(&env, &job).await;
    for attempt in 1..=3 {
        let pod = format!("flaky-scanner-{attempt}-agentgate");
        wait_for(
            &pod,
            Duration::from_secs(30),
            || job_pods(&env.admin, &env.ns, &job),
            |pods: &Vec<Pod>| pods.iter().any(|p| p.name_any() == pod),
        )
        .await;
        finish_pod(&env.admin, &env.ns, &pod, 1, &usage_report("gpt-4o-mini", 1_000, 0, 100, json!(null))).await;
    }
    let failed = wait_phase(&env, "flaky", "Failed").await;
    let status = failed.status.unwrap();
    assert_eq!(status.attempts.len(), 3);
    assert!(status.attempts.iter().all(|a| a.result == agentgate::api::AttemptResult::Failed));
    assert_eq!(status.usage.unwrap().total_tokens, 3 * 1_100, "usage of every attempt is kept");
    assert_eq!(job_pods(&env.admin, &env.ns, &job).await.len(), 3);
    assert_eq!(condition(&done_job(&env, "flaky").await, "Stalled").unwrap().reason, "AttemptsExhausted");
}

#[tokio::test]
async fn malformed_termination_message_is_recorded_not_guessed() {
    let env = setup("lc-malformed").await;
    let job = create_job(&env, &job_manifest("garbled", json!({}))).await;
    approve(&env, &job).await;
    wait_pods(&env, &job, 1).await;
    finish_pod(&env.admin, &env.ns, "garbled-scanner-1-agentgate", 0, "Traceback (most recent call last): boom").await;
    let done = wait_phase(&env, "garbled", "Succeeded").await;
    let reported = condition(&done, "UsageReported").unwrap();
    assert_eq!((reported.status.as_str(), reported.reason.as_str()), ("False", "MalformedReport"));
    assert!(reported.message.contains("garbled-scanner-1-agentgate"), "{}", reported.message);
    assert_eq!(done.status.unwrap().usage.unwrap().total_tokens, 0, "no usage is invented");
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(env.admin.clone(), &env.ns);
    let events = wait_for(
        "MalformedReport Event",
        Duration::from_secs(10),
        || async { events.list(&Default::default()).await.unwrap().items },
        |es| es.iter().any(|e| e.reason.as_deref() == Some("MalformedReport")),
    )
    .await;
    assert!(!events.is_empty());
}

#[tokio::test]
async fn restarting_the_operator_mid_run_never_creates_a_second_pod() {
    let mut env = setup("lc-restart").await;
    let pods_api: Api<Pod> = Api::namespaced(env.admin.clone(), &env.ns);
    // Every Pod that ever exists, seen through a watch rather than only the final list.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let recorder = {
        let seen = seen.clone();
        tokio::spawn(watcher(pods_api.clone(), watcher::Config::default()).applied_objects().for_each(move |p| {
            if let Ok(p) = p {
                seen.lock().unwrap().insert(p.metadata.uid.clone().unwrap());
            }
            futures::future::ready(())
        }))
    };
    let job = create_job(
        &env,
        &job_manifest(
            "steady",
            json!({
                "agents": {"supporting": [{"name": "helper", "image": "ghcr.io/acme/helper:1", "model": "gpt-4o-mini"}]},
            }),
        ),
    )
    .await;
    approve(&env, &job).await;
    wait_pods(&env, &job, 2).await;
    for round in 0..3 {
        env.start_operator();
        // The new operator has listed every job and worked through them once it has estimated a
        // job created after it started; only then does "no second Pod" mean something.
        let probe = format!("probe-{round}");
        create_job(&env, &job_manifest(&probe, json!({}))).await;
        wait_phase(&env, &probe, "AwaitingApproval").await;
        assert_eq!(job_pods(&env.admin, &env.ns, &job).await.len(), 2);
    }
    finish_pod(&env.admin, &env.ns, "steady-scanner-1-agentgate", 0, &usage_report("gpt-4o-mini", 100, 0, 10, json!({}))).await;
    env.start_operator();
    finish_pod(&env.admin, &env.ns, "steady-helper-1-agentgate", 0, &usage_report("gpt-4o-mini", 200, 0, 20, json!({}))).await;
    let done = wait_phase(&env, "steady", "Succeeded").await;
    assert_eq!(done.status.unwrap().usage.unwrap().total_tokens, 330);
    // A Pod created by us now reaches the recorder after any the operator created before it (one
    // watch, in resourceVersion order): once it is seen, the recorder has seen them all.
    let barrier = pods_api.create(&PostParams::default(), &watch_barrier_pod()).await.expect("create the barrier Pod");
    let barrier = barrier.metadata.uid.unwrap();
    wait_for(
        "the recorder to see the barrier Pod",
        Duration::from_secs(30),
        || async { seen.lock().unwrap().clone() },
        |s| s.contains(&barrier),
    )
    .await;
    recorder.abort();
    assert_eq!(seen.lock().unwrap().len(), 3, "exactly one Pod per agent ever existed (and the barrier)");
}

#[tokio::test]
async fn operator_writes_observed_generation_for_every_spec_change() {
    let env = setup("lc-generation").await;
    create_job(&env, &job_manifest("tracked", json!({}))).await;
    let first = wait_for_job(&env.admin, &env.ns, "tracked", "observedGeneration 1", |j| {
        j.status.as_ref().and_then(|s| s.observed_generation) == Some(1)
    })
    .await;
    assert_eq!(condition(&first, "Ready").unwrap().observed_generation, Some(1));
    Api::<AgentJob>::namespaced(env.admin.clone(), &env.ns)
        .patch("tracked", &PatchParams::default(), &Patch::Merge(json!({"spec": {"priority": 3}})))
        .await
        .unwrap();
    let second = wait_for_job(&env.admin, &env.ns, "tracked", "observedGeneration 2", |j| {
        j.status.as_ref().and_then(|s| s.observed_generation) == Some(2)
    })
    .await;
    assert_eq!(second.status.unwrap().estimate.unwrap().generation, 2, "re-estimated for the new generation");
}

#[tokio::test]
async fn a_spec_change_while_running_leaves_the_pods_alone_and_is_reported() {
    let env = setup("lc-midrun").await;
    let job = create_job(&env, &job_manifest("busy", json!({}))).await;
    approve(&env, &job).await;
    let pods = wait_pods(&env, &job, 1).await;
    let uid = pods[0].metadata.uid.clone();
    Api::<AgentJob>::namespaced(env.admin.clone(), &env.ns)
        .patch("busy", &PatchParams::default(), &Patch::Merge(json!({"spec": {"resources": {"cpu": "1"}}})))
        .await
        .unwrap();
    let changed = wait_for_job(&env.admin, &env.ns, "busy", "SpecChangePending", |j| {
        condition(j, "SpecChangePending").is_some_and(|c| c.status == "True")
    })
    .await;
    assert!(condition(&changed, "SpecChangePending").unwrap().message.contains("generation 2 applies from the next attempt"));
    assert_eq!(phase(&changed), Some("Running"));
    let after = job_pods(&env.admin, &env.ns, &job).await;
    assert_eq!((after.len(), after[0].metadata.uid.clone()), (1, uid), "the running Pod is untouched");
    assert_eq!(after[0].spec.as_ref().unwrap().containers[0].resources.as_ref().unwrap().limits.as_ref().unwrap()["cpu"].0, "500m");
}

#[tokio::test]
async fn deleting_a_job_deletes_its_pods_through_their_owner_reference() {
    let env = setup("lc-delete").await;
    // Garbage collection is kube-controller-manager's job; run just that controller.
    let _gc = support::controlplane::ControllerManager::start(env.cp, "garbagecollector");
    let job = create_job(&env, &job_manifest("short-lived", json!({}))).await;
    approve(&env, &job).await;
    wait_pods(&env, &job, 1).await;
    Api::<AgentJob>::namespaced(env.admin.clone(), &env.ns).delete("short-lived", &kube::api::DeleteParams::foreground()).await.unwrap();
    let client = env.admin.clone();
    wait_for("the job's Pods to be collected", Duration::from_secs(60), || job_pods(&client, &env.ns, &job), |p: &Vec<Pod>| p.is_empty())
        .await;
}

#[tokio::test]
async fn a_pod_name_taken_by_another_job_is_never_adopted() {
    let env = setup("lc-collide").await;
    // `a-b` + agent `c` and `a` + agent `b-c` both name their first Pod `a-b-c-1-agentgate`.
    let first = create_job(&env, &job_manifest("a-b", json!({"agents": {"primary": {"name": "c"}}}))).await;
    approve(&env, &first).await;
    wait_phase(&env, "a-b", "Running").await;
    let second = create_job(&env, &job_manifest("a", json!({"agents": {"primary": {"name": "b-c"}}}))).await;
    wait_phase(&env, "a", "AwaitingApproval").await;
    approve(&env, &second).await;
    let second =
        wait_for_job(&env.admin, &env.ns, "a", "PodNameTaken", |j| condition(j, "Ready").is_some_and(|c| c.reason == "PodNameTaken")).await;
    assert!(second.status.as_ref().unwrap().attempts.is_empty(), "adopted another job's Pod: {:?}", second.status);
    assert!(job_pods(&env.admin, &env.ns, &second).await.is_empty());
    let ready = condition(&second, "Ready").expect("a Ready condition");
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "PodNameTaken"));
    assert!(ready.message.contains("Pod a-b-c-1-agentgate already exists and is not controlled by this job"), "{}", ready.message);
}
