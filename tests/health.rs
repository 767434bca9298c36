//! What Argo CD, kstatus and the Grafana dashboard make of the objects and metrics the operator
//! produces: the chart's Lua health scripts run in a real Lua (5.1, the dialect of Argo CD's
//! gopher-lua) and sigs.k8s.io/cli-utils' kstatus (tests/tools/kstatus) on AgentJobs and
//! AgentTools the operator wrote, read back from the apiserver as JSON.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use agentgate::api::{AgentJob, AgentTool, Decision};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use mlua::serde::SerializeOptions;
use mlua::{Lua, LuaSerdeExt};
use serde_json::{Value, json};
use support::cluster::*;
use support::controlplane::ControlPlane;
use support::http::{free_port, http_get};
use support::tools::kstatus;

const NS: &str = "health";
const CATEGORY: &str = "health-checks";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a health script of the chart the way Argo CD does: the object is the global `obj`, the
/// chunk returns `{status, message}`.
fn lua_health(script: &str, object: &Value) -> (String, String) {
    let path = root().join("charts/agentgate/argocd").join(script);
    let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let lua = Lua::new();
    // Argo CD hands the script the object as decoded JSON: a JSON null is a missing field (nil).
    let options = SerializeOptions::new().serialize_none_to_null(false).serialize_unit_to_null(false);
    lua.globals().set("obj", lua.to_value_with(object, options).unwrap()).unwrap();
    let hs: mlua::Table = lua.load(&source).set_name(script).eval().unwrap_or_else(|e| panic!("{script}: {e}"));
    let status: String = hs.get("status").unwrap();
    let message: Option<String> = hs.get("message").unwrap();
    (status, message.unwrap_or_default())
}

/// The object exactly as the apiserver serves it.
fn get_json(cp: &ControlPlane, resource: &str, name: &str) -> Value {
    let out = cp.kubectl("admin", &["get", resource, name, "-n", NS, "-o", "json"]);
    assert!(out.status.success(), "kubectl get {resource} {name}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn job(name: &str, patch: Value) -> AgentJob {
    let agent = JobManifest::new(name).category(CATEGORY).primary("agent", "ghcr.io/acme/agent:1", "gpt-4o-mini");
    agent.resources("500m", "512Mi").spec(patch).build()
}

async fn phase_of(client: &Client, name: &str, want: &'static str) -> AgentJob {
    wait_for_job(client, NS, name, want, |j| phase(j) == Some(want)).await
}

/// GET /metrics: the exposition, once the operator answered 200.
fn scrape(port: u16) -> String {
    let (status, body) = http_get(port, "/metrics");
    assert!(status.starts_with("HTTP/1.0 200") || status.starts_with("HTTP/1.1 200"), "{status}");
    body
}

/// The sample names each metric family exposes, from its `# TYPE` line.
fn sample_names(exposition: &str) -> BTreeMap<String, Vec<String>> {
    let mut families = BTreeMap::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let (name, kind) = rest.split_once(' ').unwrap();
        let samples = match kind {
            "counter" => vec![format!("{name}_total")],
            "histogram" => ["_bucket", "_sum", "_count"].iter().map(|s| format!("{name}{s}")).collect(),
            _ => vec![name.to_string()],
        };
        families.insert(name.to_string(), samples);
    }
    families
}

/// The value of the sample with exactly this name and these labels.
fn sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
        let set: BTreeSet<String> = rest.trim_end_matches('}').split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
        let want: BTreeSet<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        (n == name && set == want).then(|| value.parse().unwrap())
    })
}

#[tokio::test]
async fn argo_cd_health_kstatus_and_the_dashboard_read_what_the_operator_wrote() {
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let mut env = Env::builder(NS).node("health-node", "8", "32Gi", &[]).metrics_addr(&metrics_addr).build().await;
    let (cp, admin, alice, bob) = (env.cp, env.admin.clone(), env.alice.clone(), env.bob.clone());

    let tools: Api<AgentTool> = Api::all(admin.clone());
    for tool in [
        json!({"type": "api", "endpoint": {"url": "https://search.tools.example/v1"}, "rateLimit": 60}),
        json!({"type": "service", "endpoint": {"service": {"namespace": NS, "name": "no-such-service", "port": 80}}, "rateLimit": 60}),
    ] {
        let name = if tool["type"] == "api" { "health-search" } else { "health-missing" };
        let t: AgentTool = serde_json::from_value(json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentTool",
            "metadata": {"name": name}, "spec": tool}))
        .unwrap();
        tools.create(&PostParams::default(), &t).await.expect("create tool");
    }

    let jobs: Api<AgentJob> = Api::namespaced(admin.clone(), NS);
    let mut created = BTreeMap::new();
    for j in [
        job("waits", json!({})),
        job("too-big", json!({"resources": {"cpu": "64"}})),
        job("runs", json!({})),
        job("works", json!({})),
        job("breaks", json!({})),
        job("vetoed", json!({})),
        job("pricey", json!({"budget": {"maxCostUSD": "0.000001"}})),
        job("unpriced", json!({"agents": {"primary": {"model": "no-such-model"}}})),
    ] {
        let j = jobs.create(&PostParams::default(), &j).await.expect("create job");
        created.insert(j.metadata.name.clone().unwrap(), j);
    }
    for name in ["too-big", "runs", "works", "breaks"] {
        phase_of(&admin, name, "AwaitingApproval").await;
        vote(&alice, &created[name], "alice", Decision::Approve).await;
        vote(&bob, &created[name], "bob", Decision::Approve).await;
    }
    phase_of(&admin, "vetoed", "AwaitingApproval").await;
    vote(&alice, &created["vetoed"], "alice", Decision::Reject).await;

    phase_of(&admin, "runs", "Running").await;
    run_pod(&admin, NS, "runs-agent-1-agentgate").await;
    phase_of(&admin, "works", "Running").await;
    finish_pod(&admin, NS, "works-agent-1-agentgate", 0, &usage_report("gpt-4o-mini", 9_000, 1_000, 2_000, json!({"ok": true}))).await;
    phase_of(&admin, "breaks", "Running").await;
    finish_pod(&admin, NS, "breaks-agent-1-agentgate", 1, "agent crashed").await;

    let expected = [
        ("waits", "AwaitingApproval", "Suspended", "InProgress"),
        ("too-big", "WaitingForResources", "Suspended", "InProgress"),
        ("runs", "Running", "Progressing", "InProgress"),
        ("works", "Succeeded", "Healthy", "Current"),
        ("breaks", "Failed", "Degraded", "Failed"),
        ("vetoed", "Rejected", "Degraded", "Failed"),
        ("pricey", "Rejected", "Degraded", "Failed"),
        ("unpriced", "Pending", "Progressing", "InProgress"),
    ];
    let mut objects = Vec::new();
    for (name, want_phase, _, _) in expected {
        phase_of(&admin, name, want_phase).await;
        objects.push(get_json(cp, "agentjob", name));
    }
    let verdicts = kstatus(&objects);
    for ((name, want_phase, argo, ks), (object, (id, status, message))) in expected.iter().zip(objects.iter().zip(&verdicts)) {
        assert_eq!(id, &format!("AgentJob/{name}"));
        let (health, health_message) = lua_health("agentjob-health.lua", object);
        assert_eq!(&health, argo, "{name} ({want_phase}): Argo CD health {health} ({health_message})");
        assert!(health_message.starts_with(want_phase), "{name}: {health_message}");
        assert_eq!(status, ks, "{name} ({want_phase}): kstatus {status} ({message})");
    }
    let too_big = lua_health("agentjob-health.lua", &objects[1]).1;
    assert!(too_big.contains("cpu"), "the message says what is missing: {too_big}");

    for (tool, want) in [("health-search", "Healthy"), ("health-missing", "Degraded")] {
        let object = wait_for(
            &format!("{tool} checked"),
            std::time::Duration::from_secs(30),
            || async { get_json(cp, "agenttool", tool) },
            |o: &Value| o["status"]["observedGeneration"].is_i64(),
        )
        .await;
        let (health, message) = lua_health("agenttool-health.lua", &object);
        assert_eq!(health, want, "{tool}: {message}");
    }
    assert!(lua_health("agenttool-health.lua", &get_json(cp, "agenttool", "health-missing")).1.contains("no-such-service"));

    // The dashboard queries only series the operator exposes, and the panels have data.
    // Usage is counted in the reconcile after the one that stored it, with the `learned` mark.
    wait_for_job(&admin, NS, "works", "its usage counted", |j| {
        j.status.as_ref().is_some_and(|s| s.attempts.iter().all(|a| a.learned == Some(true)))
    })
    .await;
    let exposition = scrape(port);
    let families = sample_names(&exposition);
    let exposed: BTreeSet<&String> = families.values().flatten().collect();
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("charts/agentgate/dashboards/agentgate.json")).unwrap())
            .expect("the dashboard is JSON");
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("agentgate_") {
                let name: String = expr[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                assert!(exposed.contains(&name), "panel {:?} queries {name}, which the operator does not expose", panel["title"]);
                used.insert(name);
            }
            for (i, _) in expr.match_indices("le=\"") {
                let le: String = expr[i + 4..].chars().take_while(|c| *c != '"').collect();
                assert!(
                    exposition.contains(&format!("le=\"{le}\"")),
                    "panel {:?} selects bucket le={le}, which is not exposed",
                    panel["title"]
                );
            }
        }
    }
    for wanted in ["agentgate_jobs_finished_total", "agentgate_cost_usd_total", "agentgate_estimate_error_ratio_bucket"] {
        assert!(used.contains(wanted), "no panel uses {wanted}");
    }
    for wanted in ["agentgate_approval_wait_seconds_bucket", "agentgate_tool_ready"] {
        assert!(used.contains(wanted), "no panel uses {wanted}");
    }
    let finished_in = |phase: &str, category: &str| {
        sample(&exposition, "agentgate_jobs_finished_total", &[("phase", phase), ("category", category)]).unwrap_or(0.0)
    };
    let finished = |phase: &str| finished_in(phase, CATEGORY);
    assert_eq!((finished("Succeeded"), finished("Failed")), (1.0, 1.0), "{exposition}");
    // Only an approved job claims a category label (metrics.rs): the two rejected jobs count under
    // the category once an approved one has claimed it, under `other` before, which is how their
    // rejections and the approved job's finish happen to be ordered.
    assert_eq!(finished("Rejected") + finished_in("Rejected", "other"), 2.0, "{exposition}");
    assert_eq!(sample(&exposition, "agentgate_tool_ready", &[("tool", "health-search")]), Some(1.0));
    assert_eq!(sample(&exposition, "agentgate_tool_ready", &[("tool", "health-missing")]), Some(0.0));
    let cost = sample(&exposition, "agentgate_cost_usd_total", &[("model", "gpt-4o-mini"), ("category", CATEGORY)]);
    assert!(cost.is_some_and(|c| c > 0.0), "{cost:?}");
    let estimated: f64 = exposition
        .lines()
        .filter(|l| l.starts_with("agentgate_estimate_error_ratio_count{job_type="))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum();
    assert_eq!(estimated, 1.0, "one succeeded job compared with its estimate");
    // Four approvals reached (too-big, runs, works, breaks).
    assert_eq!(sample(&exposition, "agentgate_approval_wait_seconds_count", &[]), Some(4.0));
    // Every family is documented in the README's Metrics section under the name queries use.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme.split("\n## Metrics").nth(1).expect("README has a Metrics section").split("\n## ").next().unwrap();
    for (family, samples) in &families {
        let queried = if samples.len() == 1 { &samples[0] } else { family };
        assert!(section.contains(&format!("`{queried}`")), "README's Metrics section does not document {queried}");
    }

    // A spec change the operator has not seen yet: Progressing and InProgress, whatever the phase.
    env.kill_operator();
    let merge = |patch: Value| Patch::Merge(patch);
    jobs.patch("waits", &PatchParams::default(), &merge(json!({"spec": {"description": "second thoughts"}}))).await.unwrap();
    jobs.patch("works", &PatchParams::default(), &merge(json!({"spec": {"description": "run it again?"}}))).await.unwrap();
    tools.patch("health-search", &PatchParams::default(), &merge(json!({"spec": {"rateLimit": 120}}))).await.unwrap();
    jobs.create(&PostParams::default(), &job("fresh", json!({}))).await.unwrap();
    let stale = [get_json(cp, "agentjob", "waits"), get_json(cp, "agentjob", "works")];
    for (object, (_, status, message)) in stale.iter().zip(kstatus(&stale)) {
        assert!(object["metadata"]["generation"].as_i64() > object["status"]["observedGeneration"].as_i64());
        let (health, health_message) = lua_health("agentjob-health.lua", object);
        assert_eq!(health, "Progressing", "{}: {health_message}", object["metadata"]["name"]);
        assert_eq!(status, "InProgress", "{}: {message}", object["metadata"]["name"]);
    }
    let fresh = get_json(cp, "agentjob", "fresh");
    assert_eq!(lua_health("agentjob-health.lua", &fresh).0, "Progressing");
    // kstatus has nothing to go on without a status (no observedGeneration, no conditions): it
    // says Current, as the README warns. Argo CD, with the script, does better.
    assert_eq!(kstatus(std::slice::from_ref(&fresh))[0].1, "Current");
    assert_eq!(lua_health("agenttool-health.lua", &get_json(cp, "agenttool", "health-search")).0, "Progressing");

    // Once the operator is back, each settles again: the finished job stays Healthy and says it
    // will not run the new spec.
    env.start_operator();
    let observed = |j: &AgentJob| j.status.as_ref().and_then(|s| s.observed_generation) == j.metadata.generation;
    wait_for_job(&admin, NS, "waits", "generation 2 observed", observed).await;
    let works = wait_for_job(&admin, NS, "works", "generation 2 observed", observed).await;
    assert_eq!(condition(&works, "SpecChangePending").map(|c| c.reason.as_str()), Some("JobFinished"));
    phase_of(&admin, "fresh", "AwaitingApproval").await;
    let settled = [get_json(cp, "agentjob", "waits"), get_json(cp, "agentjob", "works"), get_json(cp, "agentjob", "fresh")];
    let statuses: Vec<String> = kstatus(&settled).into_iter().map(|(_, s, _)| s).collect();
    let health: Vec<String> = settled.iter().map(|o| lua_health("agentjob-health.lua", o).0).collect();
    assert_eq!(health, ["Suspended", "Healthy", "Suspended"]);
    assert_eq!(statuses, ["InProgress", "Current", "InProgress"]);
    let search = wait_for(
        "health-search generation 2 checked",
        std::time::Duration::from_secs(30),
        || async { get_json(cp, "agenttool", "health-search") },
        |o: &Value| o["status"]["observedGeneration"] == o["metadata"]["generation"],
    )
    .await;
    assert_eq!(lua_health("agenttool-health.lua", &search).0, "Healthy");
}
