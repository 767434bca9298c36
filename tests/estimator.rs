//! The cost estimator learns from finished runs and keeps what it learned across the deletion
//! of those jobs and an operator restart (state in the ConfigMap `agentgate-estimator`).

mod support;

use std::time::Duration;

use agentgate::api::{AgentJob, Decision};
use agentgate::domain::learning::EstimatorState;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ListParams, ObjectList, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use support::cluster::*;

const JOB_TYPE: &str = "estimator_learning_scan";

fn job_manifest(name: &str) -> AgentJob {
    JobManifest::new(name).job_type(JOB_TYPE).build()
}

async fn estimated(client: &Client, ns: &str, name: &str) -> AgentJob {
    wait_for_job(client, ns, name, "an estimate", |j: &AgentJob| j.status.as_ref().is_some_and(|s| s.estimate.is_some())).await
}

async fn learned_state(client: &Client, ns: &str) -> Option<EstimatorState> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns).get_opt("agentgate-estimator").await.ok()??;
    let text = cm.data?.remove("state.json")?;
    let (state, warning) = EstimatorState::from_json(Some(&text));
    warning.is_none().then_some(state)
}

#[tokio::test]
async fn learned_usage_survives_job_deletion_and_operator_restart() {
    let ns = "est-learn";
    let mut env = Env::builder(ns).node("estimator-node", "64", "256Gi", &[]).build().await;
    let (client, alice, bob) = (env.admin.clone(), env.alice.clone(), env.bob.clone());
    let jobs: Api<AgentJob> = Api::namespaced(client.clone(), ns);

    // Three runs: the first estimated from the prior, each with a known, much larger usage.
    let runs = [(300_000, 100_000, 50_000), (420_000, 60_000, 70_000), (350_000, 90_000, 40_000)];
    let mut prior = None;
    for (i, (input, cached, output)) in runs.iter().enumerate() {
        let name = format!("run-{i}");
        let job = jobs.create(&PostParams::default(), &job_manifest(&name)).await.expect("create job");
        let estimate = estimated(&client, ns, &name).await.status.unwrap().estimate.unwrap();
        assert_eq!(estimate.samples, i as i64, "run {i} sees the runs before it: {estimate:?}");
        assert_eq!(estimate.method, if i == 0 { "prior" } else { "blend" });
        prior.get_or_insert(estimate);
        vote(&alice, &job, "alice", Decision::Approve).await;
        vote(&bob, &job, "bob", Decision::Approve).await;
        let pod = format!("{name}-scanner-1");
        wait_for("the agent Pod", Duration::from_secs(30), || job_pods(&client, ns, &job), |p: &Vec<_>| p.len() == 1).await;
        run_pod(&client, ns, &pod).await;
        finish_pod(&client, ns, &pod, 0, &usage_report("gpt-4o-mini", *input, *cached, *output, json!({}))).await;
        wait_for_job(&client, ns, &name, "Succeeded", |j| phase(j) == Some("Succeeded")).await;
        // The leader writes what it learned within a few seconds.
        wait_for(
            "the learned state in the ConfigMap",
            Duration::from_secs(30),
            || learned_state(&client, ns),
            |s: &Option<EstimatorState>| s.as_ref().and_then(|s| s.job_types.get(JOB_TYPE)?.get(ns).map(|k| k.n)) == Some(i as u64 + 1),
        )
        .await;
    }
    let prior = prior.unwrap();
    assert_eq!((prior.method.as_str(), prior.samples), ("prior", 0));

    // The jobs go, the operator restarts (SIGKILL: nothing more is written on the way down).
    for i in 0..runs.len() {
        jobs.delete(&format!("run-{i}"), &DeleteParams::default()).await.expect("delete job");
    }
    let list = ListParams::default();
    let _ = wait_for(
        "the jobs gone",
        Duration::from_secs(30),
        || jobs.list(&list),
        |l: &Result<ObjectList<AgentJob>, kube::Error>| l.as_ref().is_ok_and(|l| l.items.is_empty()),
    )
    .await;
    env.kill_operator();
    env.start_operator();

    jobs.create(&PostParams::default(), &job_manifest("next")).await.expect("create job");
    let learned = estimated(&client, ns, "next").await.status.unwrap().estimate.unwrap();
    assert_eq!((learned.method.as_str(), learned.samples), ("blend", 3), "{learned:?}");
    // The observed totals are 450k, 550k and 480k tokens; their geometric mean is ~491k.
    let observed = runs.iter().map(|(i, c, o)| ((i + c + o) as f64).ln()).sum::<f64>() / runs.len() as f64;
    let distance = |p50: i64| ((p50 as f64).ln() - observed).abs();
    assert!(
        distance(learned.tokens.p50) < distance(prior.tokens.p50) / 4.0,
        "prior {} learned {} observed ~{:.0}: the estimate moved less than expected",
        prior.tokens.p50,
        learned.tokens.p50,
        observed.exp()
    );
    assert!(learned.tokens.p50 < observed.exp() as i64, "the prior still pulls a little: {}", learned.tokens.p50);
    let usd = |s: &str| s.parse::<f64>().unwrap();
    assert!(usd(&learned.cost_usd.p50) > usd(&prior.cost_usd.p50), "cost follows tokens");

    let state: Value = serde_json::from_str(
        &Api::<ConfigMap>::namespaced(client.clone(), ns).get("agentgate-estimator").await.unwrap().data.unwrap()["state.json"],
    )
    .unwrap();
    assert_eq!(state["version"], 4);
    assert_eq!(state["jobTypes"][JOB_TYPE][ns]["n"], 3, "learned under the job's namespace");
    assert_eq!(state["jobTypes"][JOB_TYPE][ns]["models"]["gpt-4o-mini"]["runs"].as_array().map(Vec::len), Some(3));
    assert_eq!(state["seen"].as_array().map(Vec::len), Some(3), "one key per attempt, never two");
}

/// The price table ConfigMap is watched: a job waiting for an unknown model's price is
/// estimated once an admin adds it, a broken edit is refused with an Event and the previous
/// prices stay, and a price change applies to the next estimate, all without a restart.
#[tokio::test]
async fn price_table_edits_apply_without_a_restart() {
    let ns = "est-prices";
    let env = Env::builder(ns).without_voting_rights().args(&["--price-config-map", "prices"]).build().await;
    let client = env.admin.clone();
    let jobs: Api<AgentJob> = Api::namespaced(client.clone(), ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let local = |name: &str| {
        let mut job = job_manifest(name);
        job.spec.job_type = Some("price_reload".into());
        job.spec.agents.primary.model = "local-llm".into();
        job
    };

    jobs.create(&PostParams::default(), &local("waits-for-a-price")).await.unwrap();
    wait_for_job(&client, ns, "waits-for-a-price", "UnknownModel", |j| {
        condition(j, "Estimated").is_some_and(|c| c.reason == "UnknownModel" && c.message.contains("local-llm"))
    })
    .await;

    let prices = |input: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "prices"}, "data": {
            "prices.yaml": format!("models:\n  local-llm: {{inputPerMillion: {input}, cachedInputPerMillion: 0, outputPerMillion: 0}}\n")
        }})
    };
    let apply = |cm: Value| {
        let config_maps = config_maps.clone();
        async move {
            let params = kube::api::PatchParams::apply("test").force();
            config_maps.patch("prices", &params, &kube::api::Patch::Apply(cm)).await.unwrap();
        }
    };

    // A broken table is refused, with the reason where the admin looks.
    apply(prices("-1")).await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let all = ListParams::default();
    let refused = wait_for(
        "a PriceTableInvalid Event",
        Duration::from_secs(30),
        || events.list(&all),
        |l: &Result<ObjectList<k8s_openapi::api::events::v1::Event>, kube::Error>| {
            l.as_ref().is_ok_and(|l| l.items.iter().any(|e| e.reason.as_deref() == Some("PriceTableInvalid")))
        },
    )
    .await
    .unwrap();
    let event = refused.items.iter().find(|e| e.reason.as_deref() == Some("PriceTableInvalid")).unwrap();
    assert_eq!(event.regarding.as_ref().and_then(|r| r.name.as_deref()), Some("prices"));
    assert!(event.note.as_deref().unwrap_or_default().contains("not a price"), "{event:?}");
    let still_waiting = jobs.get("waits-for-a-price").await.unwrap();
    assert!(still_waiting.status.unwrap().estimate.is_none());

    // Fixed: the waiting job is estimated at the new price (the prior's 6,000 input tokens at $2
    // per million and 1,500 output tokens at $0: exactly $0.012 at p50).
    apply(prices("2")).await;
    let job =
        wait_for_job(&client, ns, "waits-for-a-price", "an estimate", |j| j.status.as_ref().is_some_and(|s| s.estimate.is_some())).await;
    let estimate = job.status.unwrap().estimate.unwrap();
    assert_eq!(estimate.cost_usd.p50, "0.012");

    // A price change applies to the next estimate.
    apply(prices("4")).await;
    let next = wait_for(
        "an estimate at the new price",
        Duration::from_secs(30),
        || async {
            let name = format!("next-{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis());
            jobs.create(&PostParams::default(), &local(&name)).await.unwrap();
            estimated(&client, ns, &name).await.status.unwrap().estimate.unwrap()
        },
        |e| e.cost_usd.p50 == "0.024",
    )
    .await;
    assert_eq!(next.cost_usd.p90, "0.072");
}

/// The operator learns per namespace: another namespace's extreme runs of the same jobType
/// (learned earlier, here written into the ConfigMap before the operator starts) leave this
/// namespace's estimate exactly what it would be had that namespace never run anything.
#[tokio::test]
async fn another_namespaces_extreme_runs_leave_this_namespaces_estimate_unchanged() {
    use agentgate::domain::estimate::{EstimateInput, estimate, prior_tokens};
    use agentgate::domain::pricing::{PriceTable, TokenCounts};
    let ns = "est-isolate";
    let mut env = Env::builder(ns).without_voting_rights().operator(OperatorMode::Later).build().await;
    let client = env.admin.clone();

    // Twelve runs of ours at about 450k tokens; forty of another tenant's at one token each.
    let prices = PriceTable::builtin();
    let input = EstimateInput { job_type: JOB_TYPE.into(), agent_models: vec!["gpt-4o-mini".into()], tool_calls: vec![] };
    let prior = prior_tokens(&input);
    let tokens = |total: i64| -> std::collections::BTreeMap<String, TokenCounts> {
        [("gpt-4o-mini".to_string(), TokenCounts { input: total * 8 / 10, cached_input: 0, output: total - total * 8 / 10 })].into()
    };
    let mut ours_only = EstimatorState::default();
    for i in 0..12 {
        ours_only.record(&format!("ours/{i}"), ns, JOB_TYPE, &tokens(420_000 + 5_000 * i), &prior, &prices);
    }
    let mut state = ours_only.clone();
    for i in 0..40 {
        state.record(&format!("theirs/{i}"), "other-team", JOB_TYPE, &tokens(1), &prior, &prices);
    }
    let want = estimate(&input, ours_only.stats(ns, JOB_TYPE).as_ref(), &prices).unwrap();
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "agentgate-estimator"}, "data": {"state.json": state.to_json()}});
    Api::<ConfigMap>::namespaced(client.clone(), ns).create(&PostParams::default(), &serde_json::from_value(cm).unwrap()).await.unwrap();

    env.start_operator();
    let jobs: Api<AgentJob> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &job_manifest("mine")).await.expect("create job");
    let got = estimated(&client, ns, "mine").await.status.unwrap().estimate.unwrap();
    assert_eq!((got.method.as_str(), got.samples), ("history", 12), "{got:?}");
    assert_eq!((got.tokens.p50, got.tokens.p90), (want.tokens_p50, want.tokens_p90), "{got:?} vs {want:?}");
    assert!(got.tokens.p50 > 400_000, "ours, not the other tenant's one token: {got:?}");
}
